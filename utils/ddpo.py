"""DDPO's learning rule: advantages from rewards, and PPO's clipped loss over a sample's DDIM steps."""

import gc
from contextlib import nullcontext

import torch

from utils.ddim import ddim_step_with_logprob
from utils.sampling import guided_noise_pred


def compute_advantages(rewards, clip_max):
    """(n,) rewards of the whole epoch -> (n,) advantages: mean 0, std 1, clipped to +-clip_max.

    The population std (as ddpo-pytorch's np.std), so a single image gets advantage 0, not NaN.
    """
    return ((rewards - rewards.mean()) / (rewards.std(correction=0) + 1e-8)).clamp(-clip_max, clip_max)


def halvings(most):
    """most, then halved (rounding up) down to 1: 20 -> [20, 10, 5, 3, 2, 1]."""
    counts = [most]
    while counts[-1] > 1:
        counts.append((counts[-1] + 1) // 2)
    return counts


def first_that_fits(attempt, candidates):
    """The first candidate for which `attempt(candidate)` runs without the GPU running out of memory.

    Raises torch.OutOfMemoryError if none does.
    """
    for candidate in candidates:
        try:
            attempt(candidate)
            return candidate
        except torch.OutOfMemoryError:
            pass
        # Out here the exception is gone, and with it the failed attempt's frames and tensors.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    raise torch.OutOfMemoryError(f"none of {candidates} fits in GPU memory")


def policy_gradient_backward(unet, scheduler, minibatch, positive_embeds, negative_embeds, guidance_scale, eta,
                             clip_range, timesteps_per_call, backward=torch.Tensor.backward, no_sync=nullcontext):
    """Accumulate the gradient of the minibatch's PPO loss, averaged over its samples and timesteps.

    minibatch (b samples, k of their timesteps):
      latents, next_latents  (b, k, 4, h/8, w/8)   x_t and the x_{t-1} the sampler took
      log_probs              (b, k)                log-prob of that step when sampled
      timesteps              (b, k)
      advantages             (b,)
    `timesteps_per_call` timesteps of every sample go through the UNet together; each call's loss is
    weighted by its share of the k timesteps, so the gradient is the same for any grouping. `no_sync`
    is entered for all calls but the last (multi-GPU: gradients are all-reduced once).
    Returns the mean loss, share of clipped ratios and approximate KL to the sampling policy.
    """
    k = minibatch["log_probs"].shape[1]
    stats = {"loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    for start in range(0, k, timesteps_per_call):
        c = min(timesteps_per_call, k - start)
        # (b, c, ...) -> (b * c, ...), sample-major, as the advantages are repeated below
        chunk = {key: minibatch[key][:, start:start + c].flatten(0, 1)
                 for key in ("latents", "next_latents", "log_probs", "timesteps")}
        noise_pred = guided_noise_pred(unet, chunk["latents"], chunk["timesteps"], positive_embeds, negative_embeds,
                                       guidance_scale)
        _, log_prob = ddim_step_with_logprob(scheduler, noise_pred, chunk["timesteps"], chunk["latents"], eta,
                                             next_latents=chunk["next_latents"])
        advantages = minibatch["advantages"].repeat_interleave(c)  # (b * c,)
        ratio = torch.exp(log_prob - chunk["log_probs"])
        pg_loss1 = -advantages * ratio
        pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        loss = torch.maximum(pg_loss1, pg_loss2).mean()
        weight = c / k
        with nullcontext() if start + c == k else no_sync():
            backward(loss * weight)
        stats["loss"] += loss.detach() * weight
        stats["clipfrac"] += ((ratio - 1.0).abs() > clip_range).float().mean() * weight
        stats["approx_kl"] += (0.5 * (log_prob.detach() - chunk["log_probs"]) ** 2).mean() * weight
    return {key: float(value) for key, value in stats.items()}  # one device sync per minibatch, not per call
