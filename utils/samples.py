"""The samples folder: a round of images, their latents and WebUI parameters, earlier rounds in history/."""

import contextlib
import errno
import filecmp
import json
import os
import re
import shutil
import stat
import time

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from utils.errors import UserError
from utils.families import FAMILY_NAMES
from utils.files import crash_point, read_json, writing

# WebUI's own pattern for one `Key: value` pair of the settings line; a value may be "quoted, with commas"
_SETTING = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")
_NEGATIVE = "Negative prompt:"

LATENTS = "latents"
HISTORY = "history"
ROUND_FILE = "round.json"
RATING_ORDER_FILE = "rating_order.json"  # utils/ratings.py's ORDER_FILE (which imports this module)
_PARTIAL = re.compile(r"\.round_(\d+)\.partial")  # history/.round_NNN.partial: a round being moved there
_ROUND_IMAGE = re.compile(r"[0-9]+\.png")  # <seed>.png


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
    return is_image_name(name) and lives_in(folder, name)


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
    only this tells them apart). Latents saved before families were recorded are SD1.5's. UserError
    naming the file when it records a family this program does not know, or cannot be read."""
    try:
        with safe_open(path, framework="pt") as f:
            family = (f.metadata() or {}).get("family", "sd15")
    except (SafetensorError, OSError) as error:
        problem = f"not a saved latent ({type(error).__name__})"
    else:
        if family in FAMILY_NAMES:
            return family
        problem = f"a latent of a model family {family!r} that is neither {' nor '.join(FAMILY_NAMES)}"
    raise UserError(f"{path} is {problem}: move it away (the image is then VAE-encoded from its PNG) "
                    "or remove the image's rating.")


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


def is_image_name(name):
    """Whether `name` is named as a round's image is, `<seed>.png`."""
    return _ROUND_IMAGE.fullmatch(name) is not None


def round_entries(folder, rating_files=()):
    """Names in `folder` that belong to its round and move with it to history/: the images `<seed>.png`,
    latents/, round.json, rating_order.json and the ratings (scores.json, comparisons.json and the names
    in `rating_files`, score_path's and comparison_path's), with temp files a killed write left of them.
    Anything else (a person's notes, another stage's folder) is not the round's and stays where it is."""
    names = {LATENTS, ROUND_FILE, RATING_ORDER_FILE, "scores.json", "comparisons.json", *rating_files}

    def owned(name):
        base = name.removesuffix(".tmp")  # writing()'s <name>.tmp
        json_temp = name.startswith(".") and name.endswith(".tmp") and name[1:].rsplit(".", 2)[0] in names
        return base in names or is_image_name(base) or json_temp  # json_temp: .<name>.<random>.tmp

    return sorted(name for name in os.listdir(folder) if owned(name))


def archive_round(folder, rating_files=()):
    """Move the current round (round_entries) to history/round_NNN/; what is not the round's stays.

    Crash-safe: entries are moved one by one into history/.round_NNN.partial/, which is renamed to
    round_NNN only when complete. A crash in between leaves the .partial folder; the next call (or
    finish_interrupted_archive) moves what is left of that round into it and completes it, so rounds
    never mix and nothing is dropped or overwritten. history/ may be on another file system (a link
    to another drive): entries are then copied, checked and only then removed (move_entry). The
    caller holds the folder's lock. Returns the round's folder, or None if there was nothing to move.
    """
    finish_interrupted_archive(folder, rating_files)
    if not round_entries(folder, rating_files):
        return None
    number = len(history_rounds(folder)) + 1
    while os.path.exists(os.path.join(folder, HISTORY, f"round_{number:03d}")):
        number += 1
    partial = os.path.join(folder, HISTORY, f".round_{number:03d}.partial")
    os.makedirs(partial)
    return _complete_archive(folder, partial, rating_files)


def finish_interrupted_archive(folder, rating_files=()):
    """Complete a move to history/ that a crash interrupted (see archive_round); returns the rounds completed."""
    done = [_complete_archive(folder, partial, rating_files) for partial in interrupted_archives(folder)]
    for target in done:
        print(f"finished moving an interrupted round to {target}/")
    return done


def _complete_archive(folder, partial, rating_files):
    for name in round_entries(folder, rating_files):
        move_entry(os.path.join(folder, name), os.path.join(partial, name))
        crash_point("archive_round.moved_one")
    crash_point("archive_round.all_moved")
    number = int(_PARTIAL.fullmatch(os.path.basename(partial)).group(1))
    while os.path.exists(os.path.join(folder, HISTORY, f"round_{number:03d}")):
        number += 1
    final = os.path.join(folder, HISTORY, f"round_{number:03d}")
    os.rename(partial, final)
    return final


def move_entry(source, target):
    """Move a file, link or folder to `target`, never overwriting: a different `target` already there keeps
    both (the source gets a .conflict-<time> name).

    A rename when both are on one file system (atomic, no copying). Across file systems (EXDEV) a file is
    copied to `target`.copying, compared byte for byte, renamed to `target` and only then removed, and a
    folder is moved entry by entry: at every moment each file is whole in one place at least. A rerun after
    a crash finds the copy and the source both there, equal, and only removes the source.
    """
    if os.path.lexists(target) and not (_is_folder(source) and _is_folder(target)):  # folders merge
        if _same_entry(source, target):
            os.unlink(source)  # copied before a crash, not yet removed
            return
        target = f"{target}.conflict-{time.strftime('%Y%m%d-%H%M%S')}"
    if not os.path.lexists(target):
        try:
            os.rename(source, target)
            return
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
    if _is_folder(source):
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(source)):
            move_entry(os.path.join(source, name), os.path.join(target, name))
        os.rmdir(source)
        return
    _copy_then_remove(source, target)


def _is_folder(path):
    return os.path.isdir(path) and not os.path.islink(path)


def _copy_then_remove(source, target):
    copying = f"{target}.copying"
    if os.path.islink(source):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(copying)
        os.symlink(os.readlink(source), copying)
    else:
        shutil.copy2(source, copying)
        with open(copying, "rb") as f:
            os.fsync(f.fileno())  # on the other drive before the source goes
        if not filecmp.cmp(source, copying, shallow=False):
            raise OSError(errno.EIO, "the copy differs from the original", copying)
    os.replace(copying, target)  # both in target's folder: one file system
    crash_point("archive_round.copied_one")
    os.unlink(source)


def _same_entry(source, target):
    if os.path.islink(source) or os.path.islink(target):
        return os.path.islink(source) and os.path.islink(target) and os.readlink(source) == os.readlink(target)
    return os.path.isfile(source) and os.path.isfile(target) and filecmp.cmp(source, target, shallow=False)


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
        current = read_json(os.path.join(folder, ROUND_FILE))  # a regular file only: a FIFO would hang the page
        # a round made from a prompt_file has the file's lines in its parameters instead of a "prompt"
        seeds, prompts, prompt = current["seeds"], current.get("prompts", {}), current["parameters"].get("prompt")
        return {f"{seed}.png": str(prompts.get(str(seed), prompt)) for seed in seeds
                if str(seed) in prompts or prompt is not None}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return {}
