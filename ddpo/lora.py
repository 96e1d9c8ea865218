"""The UNet LoRA: peft adapters on every attention projection, and their keys in kohya's format (WebUI, ComfyUI)."""

import re

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


def add_lora(unet, rank):
    """Attach a trainable LoRA (alpha = rank, so scale 1) to every attention projection; weights fp32."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


def lora_alpha(unet):
    return unet.peft_config["default"].lora_alpha


def sdxl_original_module(module, layers_per_block):
    """An SDXL UNet attention's diffusers path -> its path in the original (sgm) UNet, which kohya's SDXL
    LoRAs are keyed by: each down block holds layers_per_block + 1 input blocks (the last is its
    downsampler; input block 0 is conv_in), each up block layers_per_block + 1 output blocks, and an
    attention is the block's second part.

    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`
    `mid_block.attentions.0.…` -> `middle_block.1.…`; `up_blocks.0.attentions.2.…` -> `output_blocks.2.1.…`
    """
    match = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)", module)
    if match:
        kind, block, layer, rest = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
        if kind == "down_blocks":
            return f"input_blocks.{1 + (layers_per_block + 1) * block + layer}.1.{rest}"
        return f"output_blocks.{(layers_per_block + 1) * block + layer}.1.{rest}"
    match = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module)
    if match:
        return f"middle_block.1.{match.group(1)}"
    raise ValueError(f"{module} is not an attention layer of an SDXL UNet")


def kohya_state_dict(peft_state_dict, alpha, family="sd15", layers_per_block=2):
    """peft keys -> the keys WebUI and ComfyUI read for a UNet LoRA of that family, fp16.

    SD1.x, as kohya's SD1 LoRAs: the diffusers module path,
    `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight` becomes
    `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`.
    SDXL, as kohya's SDXL LoRAs: the original UNet's path (sdxl_original_module), e.g.
    `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight`.
    Written here rather than with diffusers' convert_state_dict_to_kohya, which drops the
    `lora_unet_` prefix for bare peft keys and writes alpha = rank whatever training used.
    """
    kohya = {}
    for key, weight in peft_state_dict.items():
        module, kind = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key).groups()
        if family == "sdxl":
            module = sdxl_original_module(module, layers_per_block)
        name = "lora_unet_" + module.replace(".", "_")
        direction = "down" if kind == "A" else "up"
        kohya[f"{name}.lora_{direction}.weight"] = weight.detach().to("cpu", torch.float16).contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float16)
    return kohya
