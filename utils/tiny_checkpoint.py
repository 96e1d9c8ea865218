"""A tiny Stable-Diffusion-1.5-shaped checkpoint, built on disk with no download.

Same module names as SD1.5 (so LoRA keys are exactly those of a real SD1.5 LoRA), tiny widths,
random weights. Tests use it, and so can a newcomer who wants to run the whole loop first:

    python -m utils.tiny_checkpoint models/tiny_checkpoint
"""

import json
import os
import string
import sys
import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CROSS_ATTENTION_DIM = 32


def sd15_scheduler():
    """DDIM with SD1.5's noise schedule."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_unet():
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 16, 32, 32), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=CROSS_ATTENTION_DIM, attention_head_dim=2,
    )


def tiny_vae():
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, sample_size=64,
    )


def tiny_text_encoder(vocab_size):
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CROSS_ATTENTION_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))


def tiny_tokenizer(folder):
    """A character-level CLIP BPE tokenizer: letters and their word-final forms, no merges."""
    symbols = list(string.ascii_lowercase + string.digits + ",.!?'-")
    vocab = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    # model_max_length must be given: transformers 5 does not read it from a bare vocab, and the
    # pipeline pads prompts to it.
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def build_tiny_checkpoint(folder):
    """Write a complete diffusers SD1.5-layout checkpoint to `folder` and return it."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = tiny_tokenizer(scratch)
    torch.manual_seed(0)
    unet = tiny_unet()
    torch.manual_seed(0)
    vae = tiny_vae()
    torch.manual_seed(0)
    text_encoder = tiny_text_encoder(len(tokenizer))
    pipeline = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=sd15_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "models/tiny_checkpoint"
    build_tiny_checkpoint(target)
    print(f"tiny SD1.5-shaped checkpoint written to {target}/")
