"""Saved LoRAs: write them (diffusers + WebUI/kohya formats, with metadata and a card), find and load them."""

import collections
import datetime
import hashlib
import json
import os
import re

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils import logging as diffusers_logging
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from ddpo.lora import kohya_state_dict, lora_alpha
from utils.checkpoint import checkpoint_file_name, model_identity, sha256_of_file
from utils.errors import UserError
from utils.files import writing
from utils.prompts import prompt_lines

# What kohya's trainers write for the base model (ss_base_model_version, modelspec.architecture and
# .implementation): WebUI sorts LoRAs by it and hides those of another base model.
BASE_MODELS = {"sd15": ("sd_v1", "stable-diffusion-v1/lora", "diffusers"),
               "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models")}


def epoch_files(folder, epoch, prefix=""):
    """Paths of what train_policy saves for an epoch, each name starting with `prefix` (lora_name_prefix)."""
    names = {"diffusers": f"diffusers_lora_epoch_{epoch}.safetensors", "ui": f"ui_lora_epoch_{epoch}.safetensors",
             "card": f"ui_lora_epoch_{epoch}.preview.png", "optimizer": f"optimizer_epoch_{epoch}.pt",
             "preview": f"preview_epoch_{epoch}.png"}
    return {kind: os.path.join(folder, prefix + name) for kind, name in names.items()}


def check_names_fit(folder, prefix, last_epoch):
    """UserError when the longest name train_policy writes in `folder` (an epoch's file at `last_epoch`, as
    writing()'s temp file) is longer than the file system allows: the run would fail at its first save,
    after whole epochs, instead of now."""
    names = [os.path.basename(path) + ".tmp" for path in epoch_files(folder, last_epoch, prefix).values()]
    longest = max(names, key=len)
    length = len(longest.encode("utf-8", "surrogateescape"))  # the limit is in bytes
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255  # what almost every file system allows
    if length > limit:
        raise UserError(f"lora_name_prefix is too long: with it train_policy would write {longest!r}, {length} "
                        f"bytes, and the file system of {folder} allows names of {limit}; shorten it by "
                        f"{length - limit} bytes or more.")


def ui_lora_name(diffusers_path):
    """The WebUI name (`<lora:NAME:1>`) of the ui_lora file saved beside a diffusers_lora file (else its own)."""
    name = os.path.basename(diffusers_path).removesuffix(".safetensors")
    head, found, epoch = name.rpartition("diffusers_lora")
    return f"{head}ui_lora{epoch}" if found else name


def save_lora(unet, folder, epoch, prefix="", metadata=None, family="sd15"):
    """Write <prefix>ui_lora_epoch_N (kohya, keyed for the model `family`, "sd15" or "sdxl") and
    <prefix>diffusers_lora_epoch_N to `folder`; returns (diffusers path, ui path).

    `metadata` (lora_metadata's) goes into the ui_lora file's header, where WebUI and ComfyUI show it.
    Each file is written under a temporary name and renamed, so a crash never leaves half a LoRA.
    """
    state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(unet).items()}
    paths = epoch_files(folder, epoch, prefix)
    kohya = kohya_state_dict(state, lora_alpha(unet), family, unet.config.layers_per_block)
    if not all(torch.isfinite(w).all() for w in [*state.values(), *kohya.values()]):
        raise UserError(f"the LoRA of epoch {epoch} has weights that are not finite (or beyond fp16's range, in "
                        f"which WebUI files are saved); it was not saved. Lower train_policy_learning_rate.")
    with writing(paths["ui"]) as temp_path:
        save_file(kohya, temp_path, metadata=metadata or {"ss_network_module": "networks.lora",
                                                               "ss_base_model_version": BASE_MODELS[family][0]})
    # Last: resume and generate know a saved epoch by this file, so an interrupted save is not complete.
    with writing(paths["diffusers"]) as temp_path:
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state,
                                                  weight_name=os.path.basename(temp_path),
                                                  unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return paths["diffusers"], paths["ui"]


PROMPTS_LISTED = 20  # lines of a prompt list written out in full; of a longer one, the first of them
WORDS = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # a word of a prompt: letters and digits, with inner apostrophes


def prompt_metadata(settings, lines):
    """The header entries that say which prompts a LoRA was trained on (`lines`, the prompt list).

    almostperfect.prompt_lines: the lines as a JSON list, only the first PROMPTS_LISTED of a longer list,
    whose almostperfect.prompt_count says how many there are; with a prompt_file also
    almostperfect.prompt_lines_sha256 (of the lines joined by newlines, as round.json records it);
    without one almostperfect.prompt, the single prompt. ss_tag_frequency: kohya's {dataset: {tag: count}},
    here each word of the lines (variants included) and how many lines hold it: WebUI shows them as the
    LoRA's training tags.
    """
    words = collections.Counter(word for line in lines for word in set(WORDS.findall(line.lower())))
    dataset = os.path.basename(settings.prompt_file) if settings.prompt_file else "prompt"
    entries = {"ss_tag_frequency": json.dumps({dataset: dict(words.most_common())}, ensure_ascii=False),
               "almostperfect.prompt_lines": json.dumps(lines[:PROMPTS_LISTED], ensure_ascii=False),
               "almostperfect.prompt_count": str(len(lines))}
    if settings.prompt_file:
        entries["almostperfect.prompt_lines_sha256"] = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    else:
        entries["almostperfect.prompt"] = settings.prompt
    return entries


def lora_metadata(settings, epoch, unet, base_model="sd15", lines=None):
    """The ui_lora file's header: the ss_* and modelspec.* keys kohya's trainers write (and WebUI and ComfyUI
    show), and what this LoRA was trained for (prompts, epoch, reward model). All values are strings.
    `lines`: the prompt list it was trained on (prompt_lines(settings) when None).

    The file is shared, and WebUI shows its header to whoever loads it, so it names files, never paths: the
    base model by its name and WebUI short hash (utils/checkpoint.py model_identity), the reward model by its
    name and SHA-256 (docs/sharing.md)."""
    lines = lines or prompt_lines(settings)
    output_name = os.path.basename(epoch_files("", epoch, settings.lora_name_prefix)["ui"]).removesuffix(".safetensors")
    version, architecture, implementation = BASE_MODELS[base_model]
    reward_model = os.path.basename(settings.reward_model_path)
    reward_hash = sha256_of_file(settings.reward_model_path) if os.path.isfile(settings.reward_model_path) else ""
    base_name, base_hash = model_identity(settings.checkpoint_path)
    base_file = checkpoint_file_name(settings.checkpoint_path)
    base_shown = f"{base_file} [{base_hash}]" if base_hash else base_file  # as WebUI's checkpoint list shows it
    prompts = f"the prompt {lines[0]!r}" if len(lines) == 1 else f"{len(lines)} prompts (the first {lines[0]!r})"
    description = (f"DDPO LoRA (AlmostPerfect) for {prompts}, epoch {epoch}, trained against "
                   f"the reward model {reward_model}; load it on the base model {base_shown}.")
    return {
        "ss_network_module": "networks.lora", "ss_network_dim": str(settings.lora_rank),
        "ss_network_alpha": str(float(lora_alpha(unet))), "ss_base_model_version": version, "ss_v2": "False",
        "ss_output_name": output_name, "ss_sd_model_name": base_file,
        "ss_resolution": f"({settings.width}, {settings.height})", "ss_epoch": str(epoch),
        "ss_num_epochs": str(settings.train_policy_num_epochs),
        "ss_learning_rate": str(settings.train_policy_learning_rate),
        "ss_seed": str(settings.seed), "ss_training_comment": description,
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
        "modelspec.implementation": implementation, "modelspec.title": output_name,
        "modelspec.resolution": f"{settings.width}x{settings.height}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "epsilon", "modelspec.description": description,
        **prompt_metadata(settings, lines), "almostperfect.negative_prompt": settings.negative_prompt,
        "almostperfect.epoch": str(epoch), "almostperfect.reward_model": reward_model,
        "almostperfect.reward_model_sha256": reward_hash,
        "almostperfect.checkpoint": base_name, "almostperfect.checkpoint_hash": base_hash or "",
    }


def save_lora_card(folder, epoch, prefix, image, size=512):
    """<prefix>ui_lora_epoch_N.preview.png beside the ui_lora file: the card WebUI shows for the LoRA."""
    path = epoch_files(folder, epoch, prefix)["card"]
    card = image.copy()
    card.thumbnail((size, size))
    with writing(path) as temp_path:
        card.save(temp_path, format="PNG")
    return path


def saved_loras(folder, prefix=""):
    """{epoch: path} of the diffusers-format LoRAs in `folder` named with exactly this prefix."""
    if not os.path.isdir(folder):
        return {}
    name = re.compile(rf"^{re.escape(prefix)}diffusers_lora_epoch_(\d+)\.safetensors$")
    found = {}
    for entry in os.listdir(folder):
        match = name.match(entry)
        if match:
            found[int(match.group(1))] = os.path.join(folder, entry)
    return found


def latest_lora(folder, prefix=""):
    """(epoch, path) of the newest diffusers-format LoRA in `folder` named with this prefix, or (0, None)."""
    found = saved_loras(folder, prefix)
    if not found:
        return 0, None
    return max(found), found[max(found)]


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
