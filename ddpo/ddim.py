"""One DDIM step that also returns the log-probability of the step it took (the DDPO policy)."""

import math

import torch
from diffusers.utils.torch_utils import randn_tensor


def ddim_step_mean_std(scheduler, noise_pred, timesteps, latents, eta):
    """The Gaussian of one DDIM step x_t -> x_{t-1} (epsilon prediction): (mean (batch, 4, h/8, w/8),
    std (batch, 1, 1, 1)).

    timesteps: int or (batch,), so one call can hold steps of different samples.
    """
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
    step_size = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_timesteps = timesteps - step_size
    # load_pipeline keeps alphas_cumprod on the UNet's device, so this is no copy (and no host sync) per step
    alphas_cumprod = scheduler.alphas_cumprod.to(latents.device)
    per_sample = (-1, *([1] * (latents.ndim - 1)))  # (batch, 1, 1, 1): broadcasts against the latents
    alpha_t = alphas_cumprod[timesteps].to(latents.dtype).view(per_sample)
    alpha_prev = torch.where(prev_timesteps >= 0, alphas_cumprod[prev_timesteps.clamp(min=0)],
                             float(scheduler.final_alpha_cumprod)).to(latents.dtype).view(per_sample)

    pred_original = (latents - (1 - alpha_t).sqrt() * noise_pred) / alpha_t.sqrt()
    if scheduler.config.clip_sample:
        pred_original = pred_original.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    # DDIM paper eq. (16): sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * pred_original + (1 - alpha_prev - std**2).sqrt() * noise_pred
    return mean, std


def ddim_step_with_logprob(scheduler, noise_pred, timesteps, latents, eta, next_latents=None, generator=None):
    """x_t -> x_{t-1} as `DDIMScheduler.step` (epsilon prediction), plus log N(x_{t-1}; mean, std²).

    noise_pred, latents: (batch, 4, h/8, w/8); timesteps: int or (batch,), so one call can hold
    steps of different samples. With `next_latents` given (training), the log-prob of that step
    is returned instead of sampling a new one. Returns (next_latents, log_prob (batch,)), the
    log-density averaged over the latent's dimensions.
    """
    mean, std = ddim_step_mean_std(scheduler, noise_pred, timesteps, latents, eta)
    if next_latents is None:
        noise = randn_tensor(noise_pred.shape, generator=generator, device=noise_pred.device, dtype=noise_pred.dtype)
        next_latents = mean + std * noise

    log_prob = -((next_latents.detach() - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
    return next_latents, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
