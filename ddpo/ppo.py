"""DDPO's learning rule: advantages from rewards, and PPO's clipped loss over a sample's DDIM steps."""

import torch

from ddpo.ddim import ddim_step_with_logprob
from ddpo.kl import step_kl_to_base
from ddpo.sampling import PROMPT_KEYS, guided_noise_pred, with_prompts


def compute_advantages(rewards, clip_max, groups=None):
    """(n,) rewards of the whole epoch -> (n,) advantages: std 1, clipped to +-clip_max.

    The baseline is the epoch's mean (groups None, upstream's), or with `groups` ((n,) ids, e.g. one per
    prompt) each group's own mean, divided by the epoch's std in both cases (Flow-GRPO's global_std: a
    group of a few images has too little spread of its own). As the seed: torch's default std (n - 1).
    A single image, or a group of one, has nothing to compare with and gets advantage 0 (upstream's NaN
    there is a bug); equal rewards give 0 too.
    """
    if rewards.numel() < 2:
        return torch.zeros_like(rewards)
    if groups is None:
        return ((rewards - rewards.mean()) / (rewards.std() + 1e-8)).clamp(-clip_max, clip_max)
    ids = torch.unique(groups, return_inverse=True)[1].to(rewards.device)  # (n,) in 0..groups-1
    counts = torch.bincount(ids).to(rewards.dtype)  # (groups,)
    means = torch.zeros_like(counts).index_add_(0, ids, rewards) / counts  # (groups,)
    advantages = (rewards - means[ids]) / (rewards.std() + 1e-8)
    return advantages.masked_fill(counts[ids] < 2, 0.0).clamp(-clip_max, clip_max)


def policy_gradient_backward(denoiser, minibatch, clip_range, timesteps_per_call, backward=torch.Tensor.backward,
                             base=None, kl_weight=0.0):
    """Accumulate the gradient of the minibatch's PPO loss as upstream does: summed over its timesteps,
    averaged over its images.

    minibatch (b samples, k of their timesteps):
      latents, next_latents  (b, k, 4, h/8, w/8)   x_t and the x_{t-1} the sampler took
      log_probs              (b, k)                log-prob of that step when sampled
      timesteps              (b, k)
      advantages             (b,)                  already clipped
      prompt_embeds, ...     (b, ...)              optional: each image's own prompt (ddpo/sampling.py PROMPT_KEYS)
    `timesteps_per_call` timesteps of every sample go through the UNet together; a call's loss, a mean
    over its b x c terms, is weighted by c, so the gradient is the same for any grouping.
    With `base` (a Denoiser of the unwrapped UNet, ddpo/kl.py) each step's KL to the base model is measured
    (one more, no-grad, UNet call) and returned as kl_to_base; kl_weight > 0 adds kl_weight x that KL to
    each timestep's loss, with its gradient (0 = upstream's loss).
    Returns the loss, share of clipped ratios and approximate KL to the sampling policy, averaged over timesteps.
    """
    k = minibatch["log_probs"].shape[1]
    stats = {"loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, **({"kl_to_base": 0.0} if base is not None else {})}
    for start in range(0, k, timesteps_per_call):
        c = min(timesteps_per_call, k - start)
        # (b, c, ...) -> (b * c, ...), sample-major, as the advantages are repeated below
        chunk = {key: minibatch[key][:, start:start + c].flatten(0, 1)
                 for key in ("latents", "next_latents", "log_probs", "timesteps")}
        # each image's prompt, (b, ...) -> (b * c, ...), repeated per timestep like the advantages
        prompts = {key: minibatch[key].repeat_interleave(c, dim=0) for key in PROMPT_KEYS if key in minibatch}
        conditioned = with_prompts(denoiser, prompts)
        noise_pred = guided_noise_pred(conditioned, chunk["latents"], chunk["timesteps"])
        _, log_prob = ddim_step_with_logprob(denoiser.scheduler, noise_pred, chunk["timesteps"], chunk["latents"],
                                             denoiser.eta, next_latents=chunk["next_latents"])
        advantages = minibatch["advantages"].repeat_interleave(c)  # (b * c,)
        ratio = torch.exp(log_prob - chunk["log_probs"])
        pg_loss1 = -advantages * ratio
        pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        loss = torch.maximum(pg_loss1, pg_loss2).mean()
        share = c / k
        if base is not None:
            kl = step_kl_to_base(conditioned, with_prompts(base, prompts), noise_pred, chunk["latents"],
                                 chunk["timesteps"])  # (b * c,)
            if kl_weight:
                loss = loss + kl_weight * kl.mean()
            stats["kl_to_base"] += kl.mean().detach() * share
        backward(loss * c)
        stats["loss"] += loss.detach() * share
        stats["clipfrac"] += ((ratio - 1.0).abs() > clip_range).float().mean() * share
        stats["approx_kl"] += (0.5 * (log_prob.detach() - chunk["log_probs"]) ** 2).mean() * share
    return {key: float(value) for key, value in stats.items()}  # one device sync per minibatch, not per call
