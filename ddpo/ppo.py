"""DDPO's learning rule: advantages from rewards, and PPO's clipped loss over a sample's DDIM steps."""

import torch

from ddpo.ddim import ddim_step_with_logprob
from ddpo.kl import base_noise_pred, step_kl
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


def base_predictions(kl, chunk, prompts):
    """The base model at a call's measured steps: (weights (n,), rows (m,) where they are > 0, its noise
    prediction (m, 4, h/8, w/8) there, or None if m = 0). chunk: one call's (n, ...) entries, `prompts` its
    PROMPT_KEYS rows; without chunk["kl_measured"] every step is measured, weight 1."""
    latents, timesteps = chunk["latents"], chunk["timesteps"]
    weights = chunk.get("kl_measured", torch.ones(len(latents), device=latents.device))
    rows = weights.nonzero()[:, 0].to(latents.device)
    if not len(rows):
        return weights, rows, None
    base = with_prompts(kl.base, {key: value[rows] for key, value in prompts.items()})
    return weights, rows, base_noise_pred(base, latents[rows], timesteps[rows])


def policy_gradient_backward(denoiser, minibatch, clip_range, timesteps_per_call, backward=torch.Tensor.backward,
                             kl=None):
    """Accumulate the gradient of the minibatch's PPO loss as upstream does: summed over its timesteps,
    averaged over its images.

    minibatch (b samples, k of their timesteps):
      latents, next_latents  (b, k, 4, h/8, w/8)   x_t and the x_{t-1} the sampler took
      log_probs              (b, k)                log-prob of that step when sampled
      timesteps              (b, k)
      advantages             (b,)                  already clipped
      prompt_embeds, ...     (b, ...)              optional: each image's own prompt (ddpo/sampling.py PROMPT_KEYS)
      kl_measured            (b, k)                optional: ddpo/kl.py measured_steps (absent: every step)
    `timesteps_per_call` timesteps of every sample go through the UNet together; a call's loss, a mean
    over its b x c terms, is weighted by c, so the gradient is the same for any grouping.
    With `kl` (ddpo/kl.py KLToBase) the KL to the base model is measured at the steps kl_measured marks (one
    more, no-grad, UNet call on those) and returned as kl_to_base, their mean, with their count in
    kl_measured_steps; kl.weight > 0 adds weight x that KL to each timestep's loss, with its gradient,
    estimated from the measured steps (0 = upstream's loss).
    Returns the loss, share of clipped ratios and approximate KL to the sampling policy, averaged over timesteps.
    """
    k = minibatch["log_probs"].shape[1]
    stats = {"loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    kl_sum, kl_count = 0.0, 0
    for start in range(0, k, timesteps_per_call):
        c = min(timesteps_per_call, k - start)
        # (b, c, ...) -> (b * c, ...), sample-major, as the advantages are repeated below
        chunk = {key: minibatch[key][:, start:start + c].flatten(0, 1)
                 for key in ("latents", "next_latents", "log_probs", "timesteps", "kl_measured") if key in minibatch}
        # each image's prompt, (b, ...) -> (b * c, ...), repeated per timestep like the advantages
        prompts = {key: minibatch[key].repeat_interleave(c, dim=0) for key in PROMPT_KEYS if key in minibatch}
        conditioned = with_prompts(denoiser, prompts)
        # the base model first, so that its activations are freed before the LoRA's are held for backward
        weights, rows, base_pred = base_predictions(kl, chunk, prompts) if kl is not None else (None, [], None)
        noise_pred = guided_noise_pred(conditioned, chunk["latents"], chunk["timesteps"])
        _, log_prob = ddim_step_with_logprob(denoiser.scheduler, noise_pred, chunk["timesteps"], chunk["latents"],
                                             denoiser.eta, next_latents=chunk["next_latents"])
        advantages = minibatch["advantages"].repeat_interleave(c)  # (b * c,)
        ratio = torch.exp(log_prob - chunk["log_probs"])
        pg_loss1 = -advantages * ratio
        pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        loss = torch.maximum(pg_loss1, pg_loss2).mean()
        share = c / k
        if len(rows):
            measured = step_kl(denoiser, noise_pred[rows], base_pred, chunk["latents"][rows],
                               chunk["timesteps"][rows])  # (rows,)
            if kl.weight:  # weight x the mean over the call's b * c steps, estimated from the measured ones
                loss = loss + kl.weight * (measured * weights[rows].to(measured)).sum() / len(noise_pred)
            kl_sum, kl_count = kl_sum + measured.detach().sum(), kl_count + len(rows)
        backward(loss * c)
        stats["loss"] += loss.detach() * share
        stats["clipfrac"] += ((ratio - 1.0).abs() > clip_range).float().mean() * share
        stats["approx_kl"] += (0.5 * (log_prob.detach() - chunk["log_probs"]) ** 2).mean() * share
    if kl is not None:
        stats.update(kl_to_base=kl_sum / max(kl_count, 1), kl_measured_steps=kl_count)
    return {key: float(value) for key, value in stats.items()}  # one device sync per minibatch, not per call
