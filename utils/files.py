"""Small helpers for the files that stages hand to each other: JSON written safely, PNG parameters read back."""

import json
import os
import re
import tempfile

from PIL import Image

# WebUI's own pattern for one `Key: value` pair of the settings line; a value may be "quoted, with commas"
_SETTING = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")
_NEGATIVE = "Negative prompt:"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read, then put back: the only portable way to learn the umask


def publish(temp_path, path):
    """Rename a finished temp file over `path` in one step (a reader sees the old file or the new one).

    Its mode becomes what a plain open() would give (0666 less the umask): mkstemp and safetensors
    write files readable by their owner only, which a WebUI or ComfyUI running as another user
    (a container, a service) could not load.
    """
    os.chmod(temp_path, 0o666 & ~_UMASK)
    os.replace(temp_path, path)


def write_json_atomic(path, obj):
    """Write obj as JSON so that a reader (or a crash) sees the old file or the new one, never half of one.

    The temporary file is in the same folder because a rename is atomic only within one file system.
    """
    folder = os.path.dirname(os.path.abspath(path))
    handle, temp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data does
        publish(temp_path, path)
    except BaseException:
        os.unlink(temp_path)
        raise


MIN_SCORE, MAX_SCORE = -5, 5


def scores_format_problem(scores):
    """Why `scores` is not in the seed WebApp's format {"<file>.png": whole number in -5..+5}, or None."""
    if not isinstance(scores, dict):
        return f"not an object {{\"<seed>.png\": score}} but a {type(scores).__name__}"
    for name, score in scores.items():
        if isinstance(score, bool) or not isinstance(score, int) or not MIN_SCORE <= score <= MAX_SCORE:
            return f"not in the expected format (the score of {name!r} is {score!r}, not a whole number from -5 to 5)"
    return None


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
