"""The samples folder: a round of images, their latents and WebUI parameters, earlier rounds in history/."""

import json
import os
import re
import stat
import time

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from utils.errors import UserError
from utils.files import crash_point, writing

# WebUI's own pattern for one `Key: value` pair of the settings line; a value may be "quoted, with commas"
_SETTING = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")
_NEGATIVE = "Negative prompt:"

LATENTS = "latents"
HISTORY = "history"
ROUND_FILE = "round.json"
_PARTIAL = re.compile(r"\.round_(\d+)\.partial")  # history/.round_NNN.partial: a round being moved there
STAYS = {HISTORY, ".lock"}  # what archiving a round leaves in the samples folder (utils/locks.py's lock)


def lives_in(folder, name):
    """Whether `folder`/`name` is a regular file that really is in `folder`: a symlink may point only
    to another file of the same folder (never outside it, nor into a subfolder such as history/)."""
    path = os.path.join(folder, name)
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False
    return regular and os.path.dirname(os.path.realpath(path)) == os.path.realpath(folder)


def is_round_image(folder, name):
    """Whether `name` is one of the round's images: `<seed>.png`, a real file of `folder` (see lives_in)."""
    return name.endswith(".png") and name[:-4].isdigit() and name[:-4].isascii() and lives_in(folder, name)


def round_images(folder):
    """Names of the round's images (see is_round_image) in `folder`, sorted by seed."""
    if not os.path.isdir(folder):
        return []
    return sorted((n for n in os.listdir(folder) if is_round_image(folder, n)), key=lambda n: int(n[:-4]))


def latent_file(folder, image_name):
    return os.path.join(folder, LATENTS, os.path.splitext(image_name)[0] + ".safetensors")


def save_latent(path, latent, family="sd15"):
    """Store a final latent (4, h/8, w/8) in fp16 with the model family that made it; temp file + rename."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with writing(path) as temp_path:
        save_file({"latent": latent.detach().to("cpu", torch.float16).contiguous()}, temp_path,
                  metadata={"family": family})


def load_latent(path):
    """The saved latent (4, h/8, w/8) in fp32; UserError naming the file if it is not one."""
    try:
        latent = load_file(path)["latent"].float()
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        problem = f"not a saved latent ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    else:
        if not (latent.ndim == 3 and latent.shape[0] == 4 and min(latent.shape) > 0):
            problem = f"a tensor of shape {tuple(latent.shape)}, not a latent (4, height/8, width/8)"
        elif not torch.isfinite(latent).all():
            problem = "a latent with NaN or infinite values"
        else:
            return latent
    raise UserError(f"{path} is {problem}: move it away (the image is then VAE-encoded from its PNG) "
                    "or remove the image's rating.")


def latent_family(path):
    """"sd15" or "sdxl": the family of the model that made a saved latent (both have 4 channels, so
    only this tells them apart). Latents saved before families were recorded are SD1.5's."""
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("family", "sd15")


def history_rounds(folder):
    """Earlier rounds moved to `folder`/history/, oldest first (not a move in progress, .round_NNN.partial)."""
    history = os.path.join(folder, HISTORY)
    if not os.path.isdir(history):
        return []
    return [os.path.join(history, n) for n in sorted(os.listdir(history))
            if not n.startswith(".") and os.path.isdir(os.path.join(history, n))]


def interrupted_archives(folder):
    """history/.round_NNN.partial folders: moves of a round to history/ that a crash cut short."""
    history = os.path.join(folder, HISTORY)
    if not os.path.isdir(history):
        return []
    return [os.path.join(history, n) for n in sorted(os.listdir(history)) if _PARTIAL.fullmatch(n)]


def archive_round(folder):
    """Move everything of the current round (all but history/ and the lock) to history/round_NNN/.

    Crash-safe: entries are renamed one by one into history/.round_NNN.partial/, which is renamed to
    round_NNN only when complete. A crash in between leaves the .partial folder; the next call (or
    finish_interrupted_archive) moves what is left of that round into it and completes it, so rounds
    never mix and nothing is dropped or overwritten. The caller holds the folder's lock. Returns the
    round's folder, or None if there was nothing to move.
    """
    finish_interrupted_archive(folder)
    if not [n for n in os.listdir(folder) if n not in STAYS]:
        return None
    number = len(history_rounds(folder)) + 1
    while os.path.exists(os.path.join(folder, HISTORY, f"round_{number:03d}")):
        number += 1
    partial = os.path.join(folder, HISTORY, f".round_{number:03d}.partial")
    os.makedirs(partial)
    return _complete_archive(folder, partial)


def finish_interrupted_archive(folder):
    """Complete a move to history/ that a crash interrupted (see archive_round); returns the rounds completed."""
    done = [_complete_archive(folder, partial) for partial in interrupted_archives(folder)]
    for target in done:
        print(f"finished moving an interrupted round to {target}/")
    return done


def _complete_archive(folder, partial):
    for name in sorted(n for n in os.listdir(folder) if n not in STAYS):
        target = os.path.join(partial, name)
        if os.path.lexists(target):  # never overwrite: keep both
            target = f"{target}.conflict-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(os.path.join(folder, name), target)  # within one file system: atomic, no copying
        crash_point("archive_round.moved_one")
    crash_point("archive_round.all_moved")
    number = int(_PARTIAL.fullmatch(os.path.basename(partial)).group(1))
    while os.path.exists(os.path.join(folder, HISTORY, f"round_{number:03d}")):
        number += 1
    final = os.path.join(folder, HISTORY, f"round_{number:03d}")
    os.rename(partial, final)
    return final


def webui_parameters(prompt, negative_prompt, steps, guidance_scale, seed, width, height, eta, model, lora_name,
                     model_hash=None):
    """Generation parameters as AUTOMATIC1111 WebUI writes them to a PNG's `parameters` chunk, in its order.

    `model_hash`: WebUI's short hash of the checkpoint file (utils.checkpoint.model_identity); None leaves it out.
    """
    if lora_name:
        prompt = f"{prompt} <lora:{lora_name}:1>"
    model_fields = f"Model hash: {model_hash}, Model: {model}" if model_hash else f"Model: {model}"
    return (f"{prompt}\nNegative prompt: {negative_prompt}\n"
            f"Steps: {steps}, Sampler: DDIM, CFG scale: {guidance_scale}, Seed: {seed}, Size: {width}x{height}, "
            f"{model_fields}, Eta: {eta}")


def read_png_parameters(path):
    """The PNG's `parameters` text chunk (what AUTOMATIC1111 WebUI and generate.py write), or None."""
    with Image.open(path) as image:
        return image.info.get("parameters")  # text chunks before the pixel data; the pixels are not decoded


def _unquote(value):
    """A "quoted, with commas" setting value; a malformed one (a file from elsewhere) is kept as it is."""
    try:
        return json.loads(value)
    except ValueError:
        return value.strip('"')


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
            settings[key] = _unquote(value) if value.startswith('"') else value.strip()
    prompt_lines, negative_lines = [], []
    for line in lines:
        if line.startswith(_NEGATIVE) or negative_lines:
            negative_lines.append(line.removeprefix(_NEGATIVE).strip())
        else:
            prompt_lines.append(line)
    prompt = "\n".join(prompt_lines).strip()
    loras = [(name, weight or "1") for name, weight in _LORA_TAG.findall(prompt)]
    return {"prompt": prompt, "negative_prompt": "\n".join(negative_lines), "loras": loras, "settings": settings}


def round_prompts(folder):
    """{"<seed>.png": its prompt} for the round in `folder` (the current one or one in history/), from round.json:
    its "prompts" {"<seed>": prompt} when the round was made from a prompt_file, else the round's one prompt.
    {} when the folder has no readable round.json (its images then count as one prompt group)."""
    try:
        with open(os.path.join(folder, ROUND_FILE), encoding="utf-8") as f:
            current = json.load(f)
        # a round made from a prompt_file has the file's lines in its parameters instead of a "prompt"
        seeds, prompts, prompt = current["seeds"], current.get("prompts", {}), current["parameters"].get("prompt")
        return {f"{seed}.png": str(prompts.get(str(seed), prompt)) for seed in seeds
                if str(seed) in prompts or prompt is not None}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return {}
