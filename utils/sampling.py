"""Loading the pipeline, the guided UNet, and the DDPO sampling loop (DDIM + CFG, per-step log-probs)."""

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from diffusers import DDIMScheduler
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from utils.checkpoint import load_checkpoint
from utils.ddim import ddim_step_with_logprob


def load_pipeline(checkpoint_path, device, dtype, checkpoint_config=""):
    """The pipeline at `checkpoint_path` (a diffusers folder or one WebUI/ComfyUI checkpoint file; see
    utils/checkpoint.py) with a DDIM scheduler, no safety checker, on `device`."""
    diffusers_logging.disable_progress_bar()  # a bar per component load; the stage draws its own bars
    transformers_logging.disable_progress_bar()
    pipeline = load_checkpoint(checkpoint_path, dtype, checkpoint_config)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    schedule_on(pipeline.scheduler, device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def schedule_on(scheduler, device):
    """Keep the noise schedule where the latents are: DDIM steps then look it up without a host sync."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    return scheduler


@dataclass
class Denoiser:
    """The UNet with everything a guided DDIM step needs besides the latents.

    The embeddings are the prompt's and the negative prompt's, (1, 77, dim) each, computed once per run.
    `autocast` is entered around every UNet call (utils/precision.py: mixed precision).
    """
    unet: torch.nn.Module
    scheduler: DDIMScheduler
    positive_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    guidance_scale: float
    eta: float
    autocast: Callable[[], ContextManager] = nullcontext


@torch.no_grad()
def encode_prompt(pipeline, prompt, negative_prompt, device):
    """(positive, negative) text embeddings, each (1, 77, dim)."""
    return pipeline.encode_prompt(prompt, device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                                  negative_prompt=negative_prompt)


def guided_noise_pred(denoiser, latents, timesteps):
    """Classifier-free-guided noise prediction with the uncond and cond halves in one UNet call.

    latents: (n, 4, h/8, w/8); timesteps: scalar or (n,). Returns (n, 4, h/8, w/8) in fp32.
    """
    n = latents.shape[0]
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(n)
    embeds = torch.cat([denoiser.negative_embeds.expand(n, -1, -1), denoiser.positive_embeds.expand(n, -1, -1)])
    with denoiser.autocast():
        noise_pred = denoiser.unet(torch.cat([latents, latents]).to(embeds.dtype), torch.cat([timesteps, timesteps]),
                                   encoder_hidden_states=embeds, return_dict=False)[0]
    uncond, cond = noise_pred.float().chunk(2)
    return uncond + denoiser.guidance_scale * (cond - uncond)


@torch.no_grad()
def sample_with_logprob(denoiser, generators, height, width, num_inference_steps, show_progress=False):
    """Sample one image per generator as StableDiffusionPipeline does, recording every DDIM step.

    Returns the sample record:
      latents    (batch, steps + 1, 4, h/8, w/8)  x_T ... x_0, fp32
      log_probs  (batch, steps)                   log p(x_{t-1} | x_t) under the sampling policy
      timesteps  (steps,)                          DDIM timesteps, descending
    """
    scheduler, device = denoiser.scheduler, denoiser.positive_embeds.device
    scheduler.set_timesteps(num_inference_steps, device=device)
    shape = (len(generators), denoiser.unet.config.in_channels, height // 8, width // 8)
    latents = randn_tensor(shape, generator=generators, device=device, dtype=denoiser.positive_embeds.dtype).float()
    latents = latents * scheduler.init_noise_sigma
    all_latents, all_log_probs = [latents], []
    for t in tqdm(scheduler.timesteps, desc="sampling", leave=False, disable=not show_progress):
        noise_pred = guided_noise_pred(denoiser, latents, t)
        latents, log_prob = ddim_step_with_logprob(scheduler, noise_pred, t, latents, denoiser.eta, generator=generators)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    return {
        "latents": torch.stack(all_latents, dim=1),
        "log_probs": torch.stack(all_log_probs, dim=1),
        "timesteps": scheduler.timesteps.clone(),
    }


@torch.no_grad()
def decode_latents(pipeline, latents):
    """(batch, 4, h/8, w/8) final latents -> list of PIL images, decoded where the VAE is."""
    vae = pipeline.vae
    latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    return pipeline.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")
