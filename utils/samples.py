"""The samples folder: a round of images, their latents and WebUI parameters, earlier rounds in history/."""

import json
import os
import re
import shutil

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from utils.files import publish

# WebUI's own pattern for one `Key: value` pair of the settings line; a value may be "quoted, with commas"
_SETTING = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")
_NEGATIVE = "Negative prompt:"

LATENTS = "latents"
HISTORY = "history"
ROUND_FILE = "round.json"


def round_images(folder):
    """Names of the round's images (`<seed>.png`) in `folder`, sorted by seed."""
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if n.endswith(".png") and n[:-4].isdigit()]
    return sorted(names, key=lambda n: int(n[:-4]))


def latent_file(folder, image_name):
    return os.path.join(folder, LATENTS, os.path.splitext(image_name)[0] + ".safetensors")


def save_latent(path, latent, family="sd15"):
    """Store a final latent (4, h/8, w/8) in fp16 with the model family that made it; temp file + rename."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({"latent": latent.detach().to("cpu", torch.float16).contiguous()}, path + ".tmp",
              metadata={"family": family})
    publish(path + ".tmp", path)


def load_latent(path):
    return load_file(path)["latent"].float()  # (4, h/8, w/8)


def latent_family(path):
    """"sd15" or "sdxl": the family of the model that made a saved latent (both have 4 channels, so
    only this tells them apart). Latents saved before families were recorded are SD1.5's."""
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("family", "sd15")


def history_rounds(folder):
    """Earlier rounds moved to `folder`/history/, oldest first."""
    history = os.path.join(folder, HISTORY)
    if not os.path.isdir(history):
        return []
    return [os.path.join(history, n) for n in sorted(os.listdir(history)) if os.path.isdir(os.path.join(history, n))]


def archive_round(folder):
    """Move everything of the current round (all but history/) to history/round_NNN/; delete nothing."""
    entries = [n for n in os.listdir(folder) if n != HISTORY]
    if not entries:
        return None
    number = len(history_rounds(folder)) + 1
    while os.path.exists(os.path.join(folder, HISTORY, f"round_{number:03d}")):
        number += 1
    target = os.path.join(folder, HISTORY, f"round_{number:03d}")
    os.makedirs(target)
    for name in entries:
        shutil.move(os.path.join(folder, name), os.path.join(target, name))
    return target


def webui_parameters(prompt, negative_prompt, steps, guidance_scale, seed, width, height, eta, model, lora_name):
    """Generation parameters as AUTOMATIC1111 WebUI writes them to a PNG's `parameters` chunk."""
    if lora_name:
        prompt = f"{prompt} <lora:{lora_name}:1>"
    return (f"{prompt}\nNegative prompt: {negative_prompt}\n"
            f"Steps: {steps}, Sampler: DDIM, CFG scale: {guidance_scale}, Seed: {seed}, Size: {width}x{height}, "
            f"Model: {model}, Eta: {eta}")


def read_png_parameters(path):
    """The PNG's `parameters` text chunk (what AUTOMATIC1111 WebUI and generate.py write), or None."""
    with Image.open(path) as image:
        return image.info.get("parameters")  # text chunks before the pixel data; the pixels are not decoded


def parse_webui_parameters(text):
    """Split WebUI's parameters text into prompt, negative prompt, LoRA tags and the `Key: value` settings.

    The text is: prompt lines, optionally a line starting "Negative prompt:" (which may continue on more
    lines), and a last line such as "Steps: 20, Sampler: DDIM, Seed: 123, Size: 720x1080".
    Returns {"prompt", "negative_prompt", "loras": [(name, weight)], "settings": {key: value}}, all strings.
    """
    lines = text.strip().split("\n")
    settings = {}
    if len(_SETTING.findall(lines[-1])) >= 3:  # WebUI's test too: a prompt line rarely has three "Key: value"s
        for key, value in _SETTING.findall(lines.pop()):
            settings[key] = json.loads(value) if value.startswith('"') else value.strip()
    prompt_lines, negative_lines = [], []
    for line in lines:
        if line.startswith(_NEGATIVE) or negative_lines:
            negative_lines.append(line.removeprefix(_NEGATIVE).strip())
        else:
            prompt_lines.append(line)
    prompt = "\n".join(prompt_lines).strip()
    loras = [(name, weight or "1") for name, weight in _LORA_TAG.findall(prompt)]
    return {"prompt": prompt, "negative_prompt": "\n".join(negative_lines), "loras": loras, "settings": settings}
