"""Write a diffusers SD1.x pipeline as ONE checkpoint file in the original (ldm) layout WebUI and ComfyUI use.

Our own conversion, the inverse of diffusers' single-file mapping (diffusers/loaders/single_file_utils.py):
the tests check it key by key against diffusers' conversion it must round-trip through, and then load
the file as a user's `v1-5-pruned-emaonly.safetensors` would be loaded.

    UNet          model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight
    VAE           first_stage_model.encoder.down.0.block.0.conv1.weight
    text encoder  cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight
"""

import torch
from safetensors.torch import save_file

UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
               ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def unet_prefixes(config):
    """[(diffusers module prefix, ldm module prefix)] for an SD1.x-layout UNet (any widths, any blocks)."""
    blocks, per_block = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [("mid_block.attentions.0.", "middle_block.1."),
             *((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2))]
    for i in range(blocks):
        for j in range(per_block):
            ldm = (per_block + 1) * i + j + 1
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{ldm}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{ldm}.1.")]
        for j in range(per_block + 1):
            ldm = (per_block + 1) * i + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{ldm}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{ldm}.1.")]
        if i < blocks - 1:
            pairs += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per_block + 1) * (i + 1)}.0.op."),
                      (f"up_blocks.{i}.upsamplers.0.",
                       f"output_blocks.{(per_block + 1) * i + per_block}.{1 if i == 0 else 2}.")]
    return pairs


def unet_to_ldm(state, config):
    """diffusers UNet2DConditionModel state dict -> ldm keys (without the model.diffusion_model. prefix)."""
    prefixes = unet_prefixes(config)
    ldm = {}
    for key, tensor in state.items():
        module, _, parameter = key.rpartition(".")
        if module in UNET_TOP:
            ldm[f"{UNET_TOP[module]}.{parameter}"] = tensor
            continue
        new = next(ldm_prefix + key[len(prefix):] for prefix, ldm_prefix in prefixes if key.startswith(prefix))
        if ".resnets." in key:
            for ours, theirs in UNET_RESNET:
                new = new.replace(f".{ours}.", f".{theirs}.")
        ldm[new] = tensor
    return ldm


def vae_to_ldm(state, config):
    """diffusers AutoencoderKL state dict -> ldm keys (without first_stage_model.); the decoder's blocks reversed."""
    blocks = len(config["block_out_channels"])
    ldm = {}
    for key, tensor in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for i in range(blocks):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{blocks - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample.")
        for j in range(2):
            new = new.replace(f"mid_block.resnets.{j}.", f"mid.block_{j + 1}.")
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for ours, theirs in VAE_ATTENTION:
                new = new.replace(f".{ours}.", f".{theirs}.")
            if tensor.ndim == 2:  # ldm's attention projections are 1x1 convolutions
                tensor = tensor[:, :, None, None]
        ldm[new] = tensor
    return ldm


def clip_to_ldm(state):
    """transformers CLIPTextModel state dict -> ldm keys (without cond_stage_model.transformer.)."""
    return {key if key.startswith("text_model.") else f"text_model.{key}": tensor for key, tensor in state.items()}


def pipeline_to_ldm(pipeline, dtype=None):
    """{ldm key: tensor} of a StableDiffusionPipeline's UNet, VAE and text encoder, as one checkpoint holds them."""
    parts = [(UNET_PREFIX, unet_to_ldm(pipeline.unet.state_dict(), pipeline.unet.config)),
             (VAE_PREFIX, vae_to_ldm(pipeline.vae.state_dict(), pipeline.vae.config)),
             (CLIP_PREFIX, clip_to_ldm(pipeline.text_encoder.state_dict()))]
    return {prefix + key: tensor.detach().to(dtype or tensor.dtype).contiguous()
            for prefix, state in parts for key, tensor in state.items()}


def write_single_file(pipeline, path, dtype=None):
    """Save the pipeline as one ldm-layout .safetensors checkpoint (in `dtype` if given); returns the path."""
    save_file(pipeline_to_ldm(pipeline, dtype), str(path))
    return str(path)


def write_sd2_like_file(path):
    """A tiny file with SD2.x's distinguishing keys and shapes: an OpenCLIP text encoder and 1024-wide
    cross-attention. Enough to be recognised as SD2; not a model."""
    save_file({
        UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1024),
        UNET_PREFIX + "output_blocks.11.0.skip_connection.weight": torch.zeros(8, 16, 1, 1),
        VAE_PREFIX + "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
        "cond_stage_model.model.token_embedding.weight": torch.zeros(16, 1024),
        "cond_stage_model.model.positional_embedding": torch.zeros(77, 1024),
    }, str(path))
    return str(path)
