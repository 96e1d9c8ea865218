"""Tiny Stable-Diffusion-1.5- and SDXL-shaped checkpoints, built on disk with no download.

Same module names as SD1.5 or SDXL (so LoRA keys are exactly those of a real LoRA of that family),
tiny widths. Tests use them, and so does demo.py, which runs the whole loop on the SD1.5 one:

    python -m tools.tiny_checkpoint models/tiny_checkpoint
    python -m tools.tiny_checkpoint --sdxl models/tiny_sdxl_checkpoint

Random weights alone make a poor stand-in: a random UNet's noise predictions blow the latents up
through DDIM (std ~16) and a random VAE decodes any latent to near-uniform grey, so there is nothing
for a rater to like. Two small pieces of wiring on top of the random weights fix that:

- UNet: a skip path from the input to the output predicts the noise from x_t as a denoiser of
  smooth latents would (see SMOOTH_GAIN), so 20 DDIM steps end on latents of std ~0.9 whose
  channel means differ from seed to seed. All the random blocks (every attention layer the LoRA
  trains among them) add their output to it, so a LoRA can move the images.
- VAE: decodes as SD1.5's well-known linear latent -> RGB preview map (ComfyUI's factors),
  smoothed, so an image's brightness and colour follow its latent's channel means; the encoder is
  that map's inverse, so PNGs made elsewhere encode to sensible latents.
Both paths go through GroupNorms, which would remove an image's mean; each latent channel is
therefore carried as a (+x, -x) pair of feature channels (one norm group: mean 0 exactly, and
SiLU(u) - SiLU(-u) = u), at a scale small enough that the norm's epsilon, not the feature's
variance, sets its gain, which makes the whole path linear.
"""

import json
import os
import string
import sys
import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CROSS_ATTENTION_DIM = 32
# SDXL: the UNet attends to both text encoders' hidden states side by side (768 + 1280 = 2048 in SDXL),
# and its added embedding takes the second encoder's projected pooled output (1280) + 6 ids x 256.
SDXL_TEXT_1_DIM, SDXL_TEXT_2_DIM, SDXL_POOLED_DIM, SDXL_TIME_EMBED_DIM = 16, 32, 24, 8
SDXL_CROSS_ATTENTION_DIM = SDXL_TEXT_1_DIM + SDXL_TEXT_2_DIM
SDXL_SCALING_FACTOR = 0.13025
LATENT_CHANNELS = 4
# eps = gain * x_t on the skip path, with a lower gain for smooth content than for pixel-level detail: the
# Wiener-style guess for latents whose power is mostly at low frequencies, as real images' latents are.
# 0.4 and 0.9 end DDIM (10 or 20 steps, eta 1) on latents of std ~0.9 whose channel means vary by ~0.25.
SMOOTH_GAIN, DETAIL_GAIN = 0.4, 0.9
RANDOM_BLOCKS_SHARE = 0.1  # weight of the random UNet blocks' output next to the skip path (LoRA leverage)
UNET_PAIR_SCALE = 1e-3  # feature scale of the UNet's (+x, -x) pairs: variance << GroupNorm eps 1e-5
VAE_PAIR_SCALE = 3e-5  # the same in the VAE (latents / 0.18215 reach ~5; GroupNorm eps there is 1e-6)
VAE_CONTRAST = 0.3  # pixel value (-1..1) per unit of the latent -> RGB map; higher saturates more pixels
# ComfyUI's approximate SD1.5 latent -> RGB factors (its cheap previews): rows = latent channels, columns = R, G, B
SD15_LATENT_RGB = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                   [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
SDXL_LATENT_RGB = [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],  # ComfyUI's SDXL factors
                   [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]]
BLUR = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
CENTRE = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])


def sd15_scheduler():
    """DDIM with SD1.5's noise schedule."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def sdxl_scheduler():
    """The scheduler SDXL base ships, its scheduler_config.json as is: Euler with SD1.5's betas, "leading"
    spacing, and DDIM's set_alpha_to_one and clip_sample (both false), which load_pipeline's DDIM reads."""
    return EulerDiscreteScheduler.from_config({
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
        "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
        "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False})


def _pairs(matrix, kernel):
    """Conv weight taking input channel j to output channels (2c, 2c+1) as +-matrix[c, j] * kernel."""
    matrix = torch.as_tensor(matrix, dtype=torch.float32)
    weight = torch.stack([matrix, -matrix], dim=1).reshape(2 * matrix.shape[0], matrix.shape[1])
    return weight[:, :, None, None] * kernel


def _unpairs(matrix, kernel=CENTRE):
    """3x3 conv weight reading pairs: output o = sum over c of matrix[o, c] * kernel * (input 2c - input 2c+1) / 2."""
    matrix = torch.as_tensor(matrix, dtype=torch.float32)
    weight = torch.stack([matrix, -matrix], dim=2).reshape(matrix.shape[0], 2 * matrix.shape[1]) / 2
    return weight[:, :, None, None] * kernel


def _identity_resnets(blocks):
    """Zero each resnet's and attention's residual branch, so the block passes its input through."""
    for block in blocks:
        for resnet in block.resnets:
            resnet.conv2.weight.zero_()
            resnet.conv2.bias.zero_()
        for attention in getattr(block, "attentions", None) or []:
            attention.to_out[0].weight.zero_()
            attention.to_out[0].bias.zero_()


def _set_weight(layer, weight):
    """Copy `weight` into a conv or linear layer and zero its bias."""
    layer.weight.copy_(weight)
    layer.bias.zero_()


def _plain_norm(norm):
    """A GroupNorm without its learned scale and shift."""
    norm.weight.fill_(1.0)
    norm.bias.zero_()


def _linear_norm_gain(norm, scale):
    """GroupNorm of pair features at `scale`: its output per unit of x (its epsilon sets the gain)."""
    return scale / norm.eps ** 0.5


@torch.no_grad()
def tiny_unet():
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=2,
        block_out_channels=(8, 16, 32, 32), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=CROSS_ATTENTION_DIM, attention_head_dim=2,
    )
    return _wire_skip_path(unet)


@torch.no_grad()
def tiny_sdxl_unet():
    """SDXL's block layout and transformer depth per block (1, 2, 10), so exactly its 560 attention
    projections; its added conditioning: pooled text embedding + 6 size/crop ids, each id embedded in
    SDXL_TIME_EMBED_DIM."""
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=2,
        block_out_channels=(8, 16, 32), norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        cross_attention_dim=SDXL_CROSS_ATTENTION_DIM, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * SDXL_TIME_EMBED_DIM,
    )
    return _wire_skip_path(unet)


def _wire_skip_path(unet):
    """The skip path (see the module docstring) through conv_in, the last resnet's shortcut and conv_out."""
    identity = torch.eye(LATENT_CHANNELS)
    _set_weight(unet.conv_in, _pairs(identity, CENTRE))
    # The last resnet sees [deep features, conv_in's output (8)]: keep conv_in's pairs, shrink the rest.
    last_block = unet.up_blocks[-1]
    last_resnet = last_block.resnets[-1]
    deep = last_resnet.conv_shortcut.weight.shape[1] - 2 * LATENT_CHANNELS
    last_resnet.conv_shortcut.weight[:, :deep] *= UNET_PAIR_SCALE * RANDOM_BLOCKS_SHARE
    last_resnet.conv_shortcut.weight[:, deep:] = UNET_PAIR_SCALE * torch.eye(2 * LATENT_CHANNELS)[:, :, None, None]
    last_resnet.conv_shortcut.bias.zero_()
    last_layers = [last_resnet.conv2]
    if getattr(last_block, "attentions", None):  # SD1.5's last up block ends in an attention, SDXL's in the resnet
        last_layers.append(last_block.attentions[-1].proj_out)
    for layer in last_layers:
        layer.weight *= UNET_PAIR_SCALE * RANDOM_BLOCKS_SHARE
        layer.bias *= UNET_PAIR_SCALE * RANDOM_BLOCKS_SHARE
    _plain_norm(unet.conv_norm_out)
    gains = DETAIL_GAIN * CENTRE + (SMOOTH_GAIN - DETAIL_GAIN) * BLUR  # blur keeps smooth content, drops detail
    _set_weight(unet.conv_out, _unpairs(2 * identity / _linear_norm_gain(unet.conv_norm_out, UNET_PAIR_SCALE), gains))
    return unet


@torch.no_grad()
def tiny_vae(latent_rgb=SD15_LATENT_RGB, **config):
    """`config`: SDXL's VAE differs in scaling_factor (0.13025) and force_upcast (its fp16 decode overflows)."""
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, norm_num_groups=4,
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, sample_size=64, **config,
    )
    to_rgb = VAE_CONTRAST * torch.tensor(latent_rgb)  # (4, 3): pixels = to_rgb.T @ latent
    from_rgb = torch.linalg.pinv(to_rgb.T)  # (4, 3): the latent of least norm that decodes to the pixels
    pair_identity = torch.eye(2 * LATENT_CHANNELS)[:, :, None, None]

    decoder = vae.decoder
    _set_weight(vae.post_quant_conv, torch.eye(LATENT_CHANNELS)[:, :, None, None])
    _set_weight(decoder.conv_in, _pairs(VAE_PAIR_SCALE * torch.eye(LATENT_CHANNELS), BLUR))
    _identity_resnets([*decoder.up_blocks, decoder.mid_block])
    for block in decoder.up_blocks:
        for upsampler in block.upsamplers or []:
            _set_weight(upsampler.conv, pair_identity * BLUR)
    _plain_norm(decoder.conv_norm_out)
    _set_weight(decoder.conv_out, _unpairs(2 * to_rgb.T / _linear_norm_gain(decoder.conv_norm_out, VAE_PAIR_SCALE)))

    encoder = vae.encoder
    _set_weight(encoder.conv_in, _pairs(VAE_PAIR_SCALE * from_rgb, CENTRE))
    _identity_resnets([*encoder.down_blocks, encoder.mid_block])
    box = torch.zeros(3, 3)
    box[:2, :2] = 0.25  # stride 2, padding on the bottom and right only: the 2x2 block's average
    for block in encoder.down_blocks:
        for downsampler in block.downsamplers or []:
            _set_weight(downsampler.conv, pair_identity * box)
    _plain_norm(encoder.conv_norm_out)
    mean = _unpairs(2 * torch.eye(LATENT_CHANNELS) / _linear_norm_gain(encoder.conv_norm_out, VAE_PAIR_SCALE))
    encoder.conv_out.weight.copy_(torch.cat([mean, torch.zeros_like(mean)]))
    encoder.conv_out.bias.copy_(torch.cat([torch.zeros(LATENT_CHANNELS), torch.full((LATENT_CHANNELS,), -30.0)]))
    vae.quant_conv.weight.copy_(torch.eye(2 * LATENT_CHANNELS)[:, :, None, None])  # log-variance -30: no noise
    vae.quant_conv.bias.zero_()
    return vae


def _text_config(vocab_size, hidden_size, **extra):
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **extra)


def tiny_text_encoder(vocab_size, hidden_size=CROSS_ATTENTION_DIM):
    return CLIPTextModel(_text_config(vocab_size, hidden_size))


def tiny_text_encoder_with_projection(vocab_size):
    """SDXL's second text encoder: its projected pooled output is the UNet's `text_embeds`."""
    return CLIPTextModelWithProjection(_text_config(vocab_size, SDXL_TEXT_2_DIM, projection_dim=SDXL_POOLED_DIM))


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


def build_tiny_sdxl_checkpoint(folder):
    """Write a complete diffusers SDXL-layout checkpoint to `folder` and return it: two text encoders (the
    second with projection) and two tokenizers, SDXL's UNet layout and added conditioning, SDXL's VAE
    scaling, SDXL base's scheduler config."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = tiny_tokenizer(scratch)
    torch.manual_seed(0)
    unet = tiny_sdxl_unet()
    torch.manual_seed(0)
    vae = tiny_vae(SDXL_LATENT_RGB, scaling_factor=SDXL_SCALING_FACTOR, force_upcast=True)
    torch.manual_seed(0)
    text_encoder = tiny_text_encoder(len(tokenizer), SDXL_TEXT_1_DIM)
    torch.manual_seed(0)
    text_encoder_2 = tiny_text_encoder_with_projection(len(tokenizer))
    pipeline = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, scheduler=sdxl_scheduler(), add_watermarker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sdxl = "--sdxl" in arguments
    default = "models/tiny_sdxl_checkpoint" if sdxl else "models/tiny_checkpoint"
    target = next((a for a in arguments if a != "--sdxl"), default)
    (build_tiny_sdxl_checkpoint if sdxl else build_tiny_checkpoint)(target)
    print(f"tiny {'SDXL' if sdxl else 'SD1.5'}-shaped checkpoint written to {target}/")
