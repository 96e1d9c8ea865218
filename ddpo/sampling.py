"""The guided UNet and the DDPO sampling loop (DDIM + CFG, per-step log-probs).

Both families go through the same code: SD1.x conditions the UNet on the text encoder's hidden states;
SDXL also on "added conditioning" (the second text encoder's pooled embedding and the image's size and
crop ids), carried by the Denoiser next to the hidden states.
"""

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable, ContextManager

import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ddpo.ddim import ddim_step_with_logprob


def schedule_on(scheduler, device):
    """Keep the noise schedule where the latents are: DDIM steps then look it up without a host sync."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    return scheduler


@dataclass
class Denoiser:
    """The UNet with everything a guided DDIM step needs besides the latents.

    positive_embeds: (1, 77, dim), one prompt for every image, or (n, 77, dim), each of the n latents of
    the call its own (with_prompts); negative_embeds: (1, 77, dim), shared by all images.
    SDXL's added conditioning, None for SD1.x: {"text_embeds": (1 or n, pooled dim), "time_ids": (1 or n, 6)}
    for the positive, (1, ...) for the negative, passed to every UNet call as `added_cond_kwargs`.
    `autocast` is entered around every UNet call (ddpo/precision.py: mixed precision).
    """
    unet: torch.nn.Module
    scheduler: DDIMScheduler
    positive_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    guidance_scale: float
    eta: float
    positive_added: dict = None
    negative_added: dict = None
    autocast: Callable[[], ContextManager] = nullcontext


# Keys of a sample record that hold each image's own prompt conditioning (the Denoiser's positive fields):
# prompt_embeds (n, 77, dim); SDXL's added_text_embeds (n, pooled dim) and added_time_ids (n, 6).
PROMPT_KEYS = ("prompt_embeds", "added_text_embeds", "added_time_ids")


def prompt_record(conditioning):
    """A conditioning (prompt_conditioning's keys, each image's own) as sample-record entries, PROMPT_KEYS."""
    record = {"prompt_embeds": conditioning["positive_embeds"]}
    if conditioning.get("positive_added") is not None:
        record["added_text_embeds"] = conditioning["positive_added"]["text_embeds"]
        record["added_time_ids"] = conditioning["positive_added"]["time_ids"]
    return record


def positive_conditioning(record):
    """The Denoiser's positive fields (positive_embeds, positive_added) from sample-record entries (prompt_record's
    inverse)."""
    added = None
    if "added_text_embeds" in record:
        added = {"text_embeds": record["added_text_embeds"], "time_ids": record["added_time_ids"]}
    return {"positive_embeds": record["prompt_embeds"], "positive_added": added}


def with_prompts(denoiser, record):
    """The denoiser conditioned on each image's own prompt: `record`'s PROMPT_KEYS, (n, ...) each, row i
    for latent i of every call. A record without them keeps the denoiser's one prompt."""
    return replace(denoiser, **positive_conditioning(record)) if "prompt_embeds" in record else denoiser


@torch.no_grad()
def encode_prompt(pipeline, prompt, negative_prompt, device):
    """(positive, negative) text embeddings of an SD1.x pipeline, each (1, 77, dim)."""
    return pipeline.encode_prompt(prompt, device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                                  negative_prompt=negative_prompt)


def sdxl_time_ids(height, width):
    """(1, 6) SDXL size conditioning as StableDiffusionXLPipeline makes it by default: original size =
    target size = (height, width), crop top-left (0, 0)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


@torch.no_grad()
def prompt_conditioning(pipeline, prompt, negative_prompt, height, width, device):
    """Everything the Denoiser takes from the prompts, for either family: its keyword arguments
    positive_embeds, negative_embeds (1, 77, dim) and, for SDXL, positive_added and negative_added."""
    if not isinstance(pipeline, StableDiffusionXLPipeline):  # SD1.x
        positive, negative = encode_prompt(pipeline, prompt, negative_prompt, device)
        return {"positive_embeds": positive, "negative_embeds": negative}
    positive, negative, pooled, negative_pooled = pipeline.encode_prompt(
        prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=negative_prompt)
    time_ids = sdxl_time_ids(height, width).to(device, positive.dtype)
    return {"positive_embeds": positive, "negative_embeds": negative,
            "positive_added": {"text_embeds": pooled, "time_ids": time_ids},
            "negative_added": {"text_embeds": negative_pooled, "time_ids": time_ids}}


def guided_noise_pred(denoiser, latents, timesteps):
    """Classifier-free-guided noise prediction with the uncond and cond halves in one UNet call.

    latents: (n, 4, h/8, w/8); timesteps: scalar or (n,). Returns (n, 4, h/8, w/8) in fp32.
    The positive conditioning is (1, ...), broadcast, or (n, ...), one row per latent (Denoiser).
    """
    n = latents.shape[0]
    assert denoiser.positive_embeds.shape[0] in (1, n), "one prompt for all latents, or one per latent"
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(n)
    embeds = torch.cat([denoiser.negative_embeds.expand(n, -1, -1), denoiser.positive_embeds.expand(n, -1, -1)])
    added = None
    if denoiser.positive_added is not None:  # SDXL: (2n, pooled dim) and (2n, 6), uncond half first as above
        added = {key: torch.cat([denoiser.negative_added[key].expand(n, -1),
                                 denoiser.positive_added[key].expand(n, -1)])
                 for key in denoiser.positive_added}
    with denoiser.autocast():
        noise_pred = denoiser.unet(torch.cat([latents, latents]).to(embeds.dtype), torch.cat([timesteps, timesteps]),
                                   encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
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
        latents, log_prob = ddim_step_with_logprob(scheduler, noise_pred, t, latents, denoiser.eta,
                                                   generator=generators)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    return {
        "latents": torch.stack(all_latents, dim=1),
        "log_probs": torch.stack(all_log_probs, dim=1),
        "timesteps": scheduler.timesteps.clone(),
    }


