"""Loading the pipeline for the stages (DDIM scheduler, no safety checker) and decoding latents to images."""

import torch
from diffusers import DDIMScheduler
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from ddpo.sampling import schedule_on
from utils.checkpoint import load_checkpoint, model_family
from utils.errors import UserError


def load_pipeline(checkpoint_path, device, dtype, checkpoint_config=""):
    """The pipeline at `checkpoint_path` (a diffusers folder or one WebUI/ComfyUI checkpoint file; see
    utils/checkpoint.py) with a DDIM scheduler, no safety checker, on `device`."""
    diffusers_logging.disable_progress_bar()  # a bar per component load; the stage draws its own bars
    transformers_logging.disable_progress_bar()
    pipeline = load_checkpoint(checkpoint_path, dtype, checkpoint_config)
    # A checkpoint that ships another sampler's config (SDXL's Euler) lacks DDIM's keys, whose defaults
    # (clip x0 to [-1, 1], no noise in the last step) are wrong for latents and make the last log-prob undefined.
    missing = {k: v for k, v in {"clip_sample": False, "set_alpha_to_one": False}.items()
               if k not in pipeline.scheduler.config}
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, **missing)
    schedule_on(pipeline.scheduler, device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def text_encoders(pipeline):
    """The pipeline's text encoders (SDXL has two), e.g. to move them off the GPU once the prompt is encoded."""
    encoders = (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None))
    return [encoder for encoder in encoders if encoder is not None]


def text_tokenizers(pipeline):
    """The tokenizers of the pipeline's text encoders (SDXL's two may differ), e.g. to check a prompt's length."""
    tokenizers = (pipeline.tokenizer, getattr(pipeline, "tokenizer_2", None))
    return [tokenizer for tokenizer in tokenizers if tokenizer is not None]


@torch.no_grad()
def decode_latents(pipeline, latents):
    """(batch, 4, h/8, w/8) final latents -> list of PIL images, decoded where the VAE is.

    SDXL's VAE decodes in fp32 when its config asks for it (force_upcast: its fp16 decode overflows), as
    StableDiffusionXLPipeline does; StableDiffusionPipeline ignores the flag, and so does this for SD1.x.
    """
    vae = pipeline.vae
    upcast = model_family(pipeline) == "sdxl" and vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(dtype=torch.float32)
    latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    images = vae.decode(latents, return_dict=False)[0]  # (batch, 3, h, w) in [-1, 1]
    if upcast:
        vae.to(dtype=torch.float16)
    if not torch.isfinite(images).all():  # they would be black images, that a person then rates
        raise UserError("the checkpoint's VAE decodes latents to NaN or infinite pixels: its VAE weights are not "
                        "finite (a damaged file or a broken merge) or overflow in fp16; use another checkpoint.")
    return pipeline.image_processor.postprocess(images, output_type="pil")
