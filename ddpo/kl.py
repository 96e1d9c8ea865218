"""How far the LoRA has drifted from the base model: the KL divergence of their DDIM steps.

One DDIM step is a Gaussian N(mean, std²) per latent dimension, and the LoRA and the base model share
its std (the scheduler's, times eta): only their means differ. So the KL of a step is exact and cheap,

    KL(LoRA || base) = (mean_lora - mean_base)² / (2 std²)    per dimension,

with no sampling noise, unlike log p_lora(x) - log p_base(x) at the sampled x (the same in expectation).
Like the log-probs, it is averaged over the latent's dimensions: nats per dimension and step. With the
seed's one optimizer step per epoch the PPO ratio is 1 and the KL to the *sampler* is 0; this one, to the
model the LoRA started from, is what grows when a LoRA drifts.
"""

from contextlib import contextmanager

import torch

from ddpo.ddim import ddim_step_mean_std
from ddpo.sampling import guided_noise_pred


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


def step_kl_to_base(denoiser, base, noise_pred, latents, timesteps):
    """(n,) KL of the LoRA's DDIM step from `latents` (n, 4, h/8, w/8) at `timesteps` (n,) to the base model's.

    `noise_pred` is the LoRA's (n, 4, h/8, w/8), with its gradient if the KL is to be penalised; `base` is
    a Denoiser of the unwrapped UNet whose adapters can be switched off (one no-grad UNet call).
    """
    mean_policy, std = ddim_step_mean_std(denoiser.scheduler, noise_pred, timesteps, latents, denoiser.eta)
    mean_base, _ = ddim_step_mean_std(denoiser.scheduler, base_noise_pred(base, latents, timesteps), timesteps,
                                      latents, denoiser.eta)
    return gaussian_kl(mean_policy, mean_base, std)


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

