"""How far the LoRA has drifted from the base model: the KL divergence of their DDIM steps.

One DDIM step is a Gaussian N(mean, std²) per latent dimension, and the LoRA and the base model share
its std (the scheduler's, times eta): only their means differ. So the KL of a step is exact and cheap,

    KL(LoRA || base) = (mean_lora - mean_base)² / (2 std²)    per dimension,

with no sampling noise, unlike log p_lora(x) - log p_base(x) at the sampled x (the same in expectation).
Like the log-probs, it is averaged over the latent's dimensions: nats per dimension and step. With the
seed's one optimizer step per epoch the PPO ratio is 1 and the KL to the *sampler* is 0; this one, to the
model the LoRA started from, is what grows when a LoRA drifts.

During training the base model costs one more (no-grad) UNet call per measured step, so it is measured on
an evenly spaced fraction of the epoch's images (`measured_steps`, in shuffled order), all their trained steps:
the logged KL is their mean, and the penalty an unbiased estimate of the one over every image.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ddpo.ddim import ddim_step_mean_std
from ddpo.sampling import guided_noise_pred


@dataclass
class KLToBase:
    """What training does with the KL to the base model: measure it with `base` (a Denoiser of the unwrapped
    UNet, whose adapters can be switched off) and add `weight` x it to each step's loss (0: only logged)."""
    base: object
    weight: float = 0.0


def measured_steps(images, steps, fraction):
    """(images, steps) float weights: at an evenly spaced `fraction` of the images (at least one), all their
    steps weigh images / measured images; the others' 0. Their mean is exactly 1. Whole images rather than
    scattered steps, so that the base model's calls are fewer, not just narrower: on a small or latency-bound
    model the cost of a call hardly depends on its rows."""
    count = max(1, round(fraction * images))
    weights = torch.zeros(images, steps)
    weights[torch.linspace(0, images - 1, count).round().long()] = images / count
    return weights


def gaussian_kl(mean_policy, mean_base, std):
    """(batch, ...) means, std broadcasting against them -> (batch,) KL per dimension, averaged over the dimensions."""
    kl = (mean_policy - mean_base) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


@contextmanager
def adapters_disabled(unet):
    """The UNet as the base model inside the block (peft's adapters off), with its LoRA again after."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


@torch.no_grad()
def base_noise_pred(denoiser, latents, timesteps):
    """The base model's guided noise prediction (n, 4, h/8, w/8) at latents (n, 4, h/8, w/8): the denoiser's
    UNet with its adapters disabled, no gradient. `denoiser` must hold the unwrapped UNet (peft's methods)."""
    with adapters_disabled(denoiser.unet):
        return guided_noise_pred(denoiser, latents, timesteps)


def step_kl(denoiser, noise_pred, base_pred, latents, timesteps):
    """(n,) KL of the DDIM step from `latents` (n, 4, h/8, w/8) at `timesteps` (n,) with the LoRA's noise
    prediction `noise_pred` to the one with the base model's `base_pred` (both (n, 4, h/8, w/8)); the
    gradient flows through noise_pred if it has one."""
    mean_policy, std = ddim_step_mean_std(denoiser.scheduler, noise_pred, timesteps, latents, denoiser.eta)
    mean_base, _ = ddim_step_mean_std(denoiser.scheduler, base_pred, timesteps, latents, denoiser.eta)
    return gaussian_kl(mean_policy, mean_base, std)


def step_kl_to_base(denoiser, base, noise_pred, latents, timesteps):
    """step_kl with the base model's prediction made here: `base` is a Denoiser of the unwrapped UNet whose
    adapters can be switched off (one no-grad UNet call)."""
    return step_kl(denoiser, noise_pred, base_noise_pred(base, latents, timesteps), latents, timesteps)


@torch.no_grad()
def trajectory_kl_to_base(denoiser, record):
    """(batch,) KL of the LoRA's steps along sampled trajectories to the base model's, averaged over the steps.

    record: sample_with_logprob's, latents (batch, steps + 1, 4, h/8, w/8) and timesteps (steps,), sampled
    with the LoRA on; two no-grad UNet calls per step (the LoRA's and the base model's).
    """
    latents, timesteps = record["latents"], record["timesteps"]
    per_step = [step_kl_to_base(denoiser, denoiser, guided_noise_pred(denoiser, latents[:, j], t), latents[:, j],
                                t.reshape(1).expand(len(latents)))
                for j, t in enumerate(timesteps)]
    return torch.stack(per_step, dim=1).mean(1)

