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

from utils.cli import UserError
from utils.files import publish

TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
DIFFUSERS_NAME = re.compile(r"^diffusers_lora_epoch_(\d+)\.safetensors$")


def add_lora(unet, rank):
    """Attach a trainable LoRA (alpha = rank, so scale 1) to every attention projection; weights fp32."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


def kohya_state_dict(peft_state_dict, alpha):
    """peft keys -> the keys WebUI and ComfyUI read for an SD1.5 UNet LoRA, fp16.

    `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight` becomes
    `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`.
    Written here rather than with diffusers' convert_state_dict_to_kohya, which drops the
    `lora_unet_` prefix for bare peft keys and writes alpha = rank whatever training used.
    """
    kohya = {}
    for key, weight in peft_state_dict.items():
        module, kind = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key).groups()
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind == 'A' else 'up'}.weight"] = weight.detach().to("cpu", torch.float16).contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float16)
    return kohya


def save_lora(unet, folder, epoch):
    """Write diffusers_lora_epoch_N and ui_lora_epoch_N (kohya) to `folder`; returns both paths.

    Each file is written under a temporary name and renamed, so a crash never leaves half a LoRA.
    """
    state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(unet).items()}
    diffusers_path = os.path.join(folder, f"diffusers_lora_epoch_{epoch}.safetensors")
    ui_path = os.path.join(folder, f"ui_lora_epoch_{epoch}.safetensors")
    kohya = kohya_state_dict(state, unet.peft_config["default"].lora_alpha)
    if not all(torch.isfinite(w).all() for w in [*state.values(), *kohya.values()]):
        raise UserError(f"the LoRA of epoch {epoch} has weights that are not finite (or beyond fp16's range, in "
                        f"which WebUI files are saved); it was not saved. Lower train_policy_learning_rate.")
    save_file(kohya, ui_path + ".tmp",
              metadata={"ss_network_module": "networks.lora"})
    publish(ui_path + ".tmp", ui_path)
    # Last: resume and generate know a saved epoch by this file, so an interrupted save is not complete.
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, weight_name=f".diffusers_lora_epoch_{epoch}.tmp",
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    publish(os.path.join(folder, f".diffusers_lora_epoch_{epoch}.tmp"), diffusers_path)
    return diffusers_path, ui_path


def latest_lora(folder):
    """(epoch, path) of the newest diffusers-format LoRA in `folder`, or (0, None)."""
    found = {int(m.group(1)): os.path.join(folder, m.group(0))
             for m in map(DIFFUSERS_NAME.match, os.listdir(folder) if os.path.isdir(folder) else []) if m}
    if not found:
        return 0, None
    return max(found), found[max(found)]


def load_lora_into_unet(unet, path):
    """Load a saved diffusers-format LoRA into the UNet's trainable adapter (to resume training)."""
    state, _ = StableDiffusionPipeline.lora_state_dict(path)
    unet_state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")})
    incompatible = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    unexpected = getattr(incompatible, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{path} does not match this UNet: unexpected keys such as {unexpected[0]}")
