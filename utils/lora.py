"""The UNet LoRA: create it, save it (diffusers + WebUI/kohya formats), find and load saved ones."""

import os
import re

import torch
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from utils.files import publish

TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
DIFFUSERS_NAME = re.compile(r"^diffusers_lora_epoch_(\d+)\.safetensors$")
# kohya's ss_base_model_version: WebUI reads it to tell an SDXL LoRA from an SD1.x one (its LoRA tab filter)
KOHYA_BASE_MODEL = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


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
        kohya[f"{name}.lora_{'down' if kind == 'A' else 'up'}.weight"] = weight.detach().to("cpu", torch.float16).contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float16)
    return kohya


def save_lora(unet, folder, epoch, family="sd15"):
    """Write diffusers_lora_epoch_N and ui_lora_epoch_N (kohya, keyed for the model `family`, "sd15" or
    "sdxl") to `folder`; returns both paths.

    Each file is written under a temporary name and renamed, so a crash never leaves half a LoRA.
    """
    state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(unet).items()}
    diffusers_path = os.path.join(folder, f"diffusers_lora_epoch_{epoch}.safetensors")
    ui_path = os.path.join(folder, f"ui_lora_epoch_{epoch}.safetensors")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, weight_name=f".diffusers_lora_epoch_{epoch}.tmp",
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    publish(os.path.join(folder, f".diffusers_lora_epoch_{epoch}.tmp"), diffusers_path)
    kohya = kohya_state_dict(state, lora_alpha(unet), family, unet.config.layers_per_block)
    save_file(kohya, ui_path + ".tmp", metadata={"ss_network_module": "networks.lora",
                                                 "ss_base_model_version": KOHYA_BASE_MODEL[family]})
    publish(ui_path + ".tmp", ui_path)
    return diffusers_path, ui_path


def saved_loras(folder):
    """{epoch: path} of the diffusers-format LoRAs in `folder`."""
    if not os.path.isdir(folder):
        return {}
    found = {}
    for name in os.listdir(folder):
        match = DIFFUSERS_NAME.match(name)
        if match:
            found[int(match.group(1))] = os.path.join(folder, name)
    return found


def latest_lora(folder):
    """(epoch, path) of the newest diffusers-format LoRA in `folder`, or (0, None)."""
    found = saved_loras(folder)
    if not found:
        return 0, None
    epoch = max(found)
    return epoch, found[epoch]


def load_lora_into_unet(unet, path):
    """Load a saved diffusers-format LoRA into the UNet's trainable adapter (to resume training)."""
    state, _ = StableDiffusionPipeline.lora_state_dict(path)
    unet_state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")})
    incompatible = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    unexpected = getattr(incompatible, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{path} does not match this UNet: unexpected keys such as {unexpected[0]}")
