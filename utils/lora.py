"""The UNet LoRA: create it, save it (diffusers + WebUI/kohya formats), find and load saved ones."""

import os
import re

import torch
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils import logging as diffusers_logging
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


def lora_alpha(unet):
    return unet.peft_config["default"].lora_alpha


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
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, weight_name=f".diffusers_lora_epoch_{epoch}.tmp",
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    publish(os.path.join(folder, f".diffusers_lora_epoch_{epoch}.tmp"), diffusers_path)
    save_file(kohya_state_dict(state, lora_alpha(unet)), ui_path + ".tmp", metadata={"ss_network_module": "networks.lora"})
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


def _unet_lora_state(path):
    """The UNet part of a saved diffusers-format LoRA, with peft keys; UserError if the file is not one."""
    try:
        state, _ = StableDiffusionPipeline.lora_state_dict(path)
    except (OSError, ValueError, KeyError) as error:  # truncated, not safetensors, or no LoRA keys in it
        raise UserError(f"{path} is not a readable diffusers-format LoRA ({str(error).splitlines()[0]}); "
                        "give another file, or move this one away.") from None
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state:
        raise UserError(f"{path} holds no UNet LoRA weights (it is not a LoRA saved by train_policy.py); "
                        "give another file, or move this one away.")
    return convert_unet_state_dict_to_peft(unet_state)


def load_lora_into_unet(unet, path):
    """Load a saved diffusers-format LoRA into the UNet's trainable adapter (to resume training).

    UserError naming the file when it is not a LoRA, was made for another UNet or with another rank.
    """
    unet_state = _unet_lora_state(path)
    ranks = {weight.shape[0] for key, weight in unet_state.items() if "lora_A" in key}
    rank = unet.peft_config["default"].r
    if ranks != {rank}:
        raise UserError(f"{path} has LoRA rank {sorted(ranks)} but lora_rank is {rank}: set --lora_rank to the "
                        "rank it was trained with, or move it away to start a new LoRA.")
    try:
        incompatible = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    except RuntimeError as error:  # shapes of another UNet
        raise UserError(f"{path} does not fit this checkpoint's UNet ({str(error).splitlines()[-1].strip()}); "
                        "it was trained on another model.") from None
    unexpected = getattr(incompatible, "unexpected_keys", None)
    if unexpected:
        raise UserError(f"{path} does not fit this checkpoint's UNet (it has keys such as {unexpected[0]}); "
                        "it was trained on another model.")


def load_lora_into_pipeline(pipeline, path):
    """pipeline.load_lora_weights(path) for generation; UserError naming the file if it is not a usable LoRA."""
    _unet_lora_state(path)  # refuses a file that is not a LoRA before diffusers half-loads it
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # our LoRAs hold UNet keys only: no "No LoRA keys ... CLIPTextModel"
    try:
        pipeline.load_lora_weights(path)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise UserError(f"{path} does not fit this checkpoint ({str(error).splitlines()[-1].strip()}); "
                        "it was trained on another model: give another LoRA or --generate_lora=none.") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
