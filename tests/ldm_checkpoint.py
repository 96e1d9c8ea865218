"""Write a diffusers SD1.x or SDXL pipeline as ONE checkpoint file in the original (ldm / sgm) layout
WebUI and ComfyUI use.

Our own conversion, the inverse of diffusers' single-file mapping (diffusers/loaders/single_file_utils.py):
the tests check it key by key against diffusers' conversion it must round-trip through, and then load
the file as a user's `v1-5-pruned-emaonly.safetensors` or `sd_xl_base_1.0.safetensors` would be loaded.

    UNet            model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight
                    (SDXL's added embedding: model.diffusion_model.label_emb.0.0.weight)
    VAE             first_stage_model.encoder.down.0.block.0.conv1.weight
    text encoder    cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight
    SDXL's first    conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight
    SDXL's second   conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight (OpenCLIP's layout)
"""

import json

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
SDXL_CLIP_PREFIX, OPEN_CLIP_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
               ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's

VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
# transformers' CLIP encoder layer -> OpenCLIP's resblock (q, k and v are one in_proj there)
OPEN_CLIP_LAYER = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}


def unet_prefixes(config):
    """[(diffusers module prefix, ldm module prefix)] for an SD1.x- or SDXL-layout UNet (any widths, any blocks)."""
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
            # an up block's upsampler follows its last resnet, and its last attention where it has them
            after = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
            pairs += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per_block + 1) * (i + 1)}.0.op."),
                      (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(per_block + 1) * i + per_block}.{after}.")]
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


def open_clip_to_ldm(state):
    """transformers CLIPTextModelWithProjection state dict -> OpenCLIP keys (without conditioner.embedders.1.model.):
    each layer's q, k, v stacked into one in_proj, the projection stored transposed ((hidden, projection))."""
    layers = "text_model.encoder.layers."
    ldm = {"text_projection": state["text_projection.weight"].T}
    for key, tensor in state.items():
        if key in OPEN_CLIP_TOP:
            ldm[OPEN_CLIP_TOP[key]] = tensor
        elif key.startswith(layers):
            layer, _, name = key.removeprefix(layers).partition(".")
            if name.startswith("self_attn.q_proj."):  # k and v join q here
                stacked = [state[key.replace(".q_proj.", f".{part}_proj.")] for part in "qkv"]
                ldm[f"transformer.resblocks.{layer}.attn.in_proj_{name.rpartition('.')[2]}"] = torch.cat(stacked)
            elif not name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                for ours, theirs in OPEN_CLIP_LAYER:
                    name = name.replace(f"{ours}.", f"{theirs}.")
                ldm[f"transformer.resblocks.{layer}.{name}"] = tensor
    return ldm


def pipeline_to_ldm(pipeline, dtype=None):
    """{ldm key: tensor} of a StableDiffusion(XL)Pipeline's UNet, VAE and text encoder(s), as one checkpoint
    holds them."""
    parts = [(UNET_PREFIX, unet_to_ldm(pipeline.unet.state_dict(), pipeline.unet.config)),
             (VAE_PREFIX, vae_to_ldm(pipeline.vae.state_dict(), pipeline.vae.config))]
    if isinstance(pipeline, StableDiffusionXLPipeline):
        parts += [(SDXL_CLIP_PREFIX, clip_to_ldm(pipeline.text_encoder.state_dict())),
                  (OPEN_CLIP_PREFIX, open_clip_to_ldm(pipeline.text_encoder_2.state_dict()))]
    else:
        parts.append((CLIP_PREFIX, clip_to_ldm(pipeline.text_encoder.state_dict())))
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


SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32"}


def write_zeros_file(shapes, path, dtype=torch.float16):
    """A .safetensors file of all-zero tensors of these {name: shape}, written sparse: a real model's size
    costs neither disk nor memory to write (the data region is a hole that reads as zeros)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = torch.Size(shape).numel() * torch.finfo(dtype).bits // 8
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads its header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        f.truncate(8 + len(encoded) + offset)
    return str(path)
