"""The model every stage loads: a diffusers folder, or ONE checkpoint file as WebUI and ComfyUI keep them.

A single file (`.safetensors`, or a `.ckpt` that loads without running code) holds only weights in the
original (ldm) layout; the configs and the CLIP tokenizer it lacks come with the project
(utils/configs/sd15, utils/configs/sdxl, utils/configs/clip_tokenizer) or from the diffusers folder
named by `checkpoint_config`. Nothing is fetched from the network. The family is read from the file's
tensor names and shapes before any weight is loaded: SD1.x and SDXL base load, anything else is one
sentence naming the file and what it is.
"""

import contextlib
import functools
import hashlib
import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from utils.errors import UserError
from utils.families import FAMILY_NAMES

CONFIGS = Path(__file__).resolve().parent / "configs"
CLIP_TOKENIZER = CONFIGS / "clip_tokenizer"
PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
NOT_LOADED = {"safety_checker", "feature_extractor", "image_encoder"}  # never used here; may be absent
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # compared with the name in lower case, as WebUI does
# diffusers' wording for a tensor of another shape than the config's model has
WRONG_SHAPE = re.compile(r"(\S+) expected shape torch\.Size\((\[[^\]]*\])\), but got torch\.Size\((\[[^\]]*\])\)")
HASH_BAR_BYTES = 256 * 2**20  # hashing files above this size shows a progress bar
# diffusers' names (infer_diffusers_model_type) for families that are not loaded, as a person says them
OTHER_FAMILIES = {
    "v2": "an SD2.x checkpoint (1024-wide OpenCLIP text encoder, often v-prediction), which is not supported",
    "inpainting": "an SD1.x inpainting checkpoint (9 input channels), which cannot generate from noise alone",
    "inpainting_v2": "an SD2.x inpainting checkpoint, which is not supported",
    "xl_inpaint": "an SDXL inpainting checkpoint, which cannot generate from noise alone",
    "xl_refiner": "an SDXL refiner, which only refines other images; use an SDXL base checkpoint",
    "playground-v2-5": "a Playground v2.5 checkpoint (EDM schedule), which is not supported",
    "upscale": "an SD x4 upscaler, which is not supported",
    "sd3": "a Stable Diffusion 3 checkpoint, which is not supported",
    "sd35_medium": "a Stable Diffusion 3.5 checkpoint, which is not supported",
    "sd35_large": "a Stable Diffusion 3.5 checkpoint, which is not supported",
}


def load_checkpoint(path, dtype, config=""):
    """The pipeline at `path` (a diffusers folder or one checkpoint file), on the CPU in `dtype`.

    Returns a StableDiffusionPipeline for SD1.x or a StableDiffusionXLPipeline for SDXL base.
    `config`: a diffusers folder whose configs and tokenizer a single file is loaded with ("" = ours).
    """
    path = str(path)
    if os.path.isdir(path):
        return _from_folder(path, folder_family(path), dtype)
    if not os.path.isfile(path):
        raise UserError(
            f"No checkpoint at {path!r}: put a diffusers folder (with model_index.json) or a WebUI/ComfyUI "
            "checkpoint file (.safetensors) there and point checkpoint_path at it (see README), or build a tiny "
            "one with `python -m tools.tiny_checkpoint models/checkpoint`.")
    family = file_family(path)
    return _from_single_file(path, family, config_folder(config, family), bool(config), dtype)


def model_family(pipeline):
    """"sdxl" for an SDXL pipeline, "sd15" for SD1.x: what the LoRA export and the reward model depend on."""
    return "sdxl" if isinstance(pipeline, StableDiffusionXLPipeline) else "sd15"


def checkpoint_file_name(path):
    """The checkpoint's file or folder name without the folders above it, as kohya writes ss_sd_model_name."""
    return os.path.basename(os.path.normpath(str(path)))


def model_identity(path):
    """(Model, Model hash) as WebUI writes them in a PNG's parameters: the file name without extension and
    WebUI's short hash (the first 10 hex digits of the whole file's SHA-256). A diffusers folder is its
    folder name and no hash: WebUI never hashes folders, so no hash of ours could match one of its."""
    if os.path.isdir(path):
        return checkpoint_file_name(path), None
    return os.path.splitext(checkpoint_file_name(path))[0], sha256_of_file(path)[:10]


def sha256_of_file(path):
    """SHA-256 of a file, read in blocks (checkpoints are gigabytes), with a progress bar for big ones.

    Remembered per (file, inode, size, modification time) for the process: a stage asks for a checkpoint's hash
    more than once (its round, each image's parameters, each LoRA's metadata), and a file replaced at the
    same path (renamed over it: another inode) or rewritten has another identity, so it is hashed again.
    """
    status = os.stat(path)
    return _sha256(os.path.realpath(path), status.st_ino, status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path, inode, size, mtime_ns):
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, leave=False,
                                     desc=f"hashing {os.path.basename(path)}", disable=size < HASH_BAR_BYTES) as bar:
        for block in iter(lambda: f.read(2**22), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


# ---------------------------------------------------------------- diffusers folders


def folder_family(path):
    """"sd15" or "sdxl" for a complete diffusers folder; any other or incomplete folder is a UserError."""
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise UserError(f"{path} is a folder without model_index.json, so not a diffusers checkpoint: point "
                        "checkpoint_path at the folder that holds model_index.json, or at a .safetensors checkpoint "
                        "file.")
    index = _read_json(index_path)
    family = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}.get(index.get("_class_name"))
    if family is None:
        raise UserError(f"{path} holds a diffusers {index.get('_class_name')}; only SD1.x (StableDiffusionPipeline) "
                        "and SDXL base (StableDiffusionXLPipeline) checkpoints are supported.")
    for component, spec in index.items():
        if component.startswith("_") or component in NOT_LOADED or not isinstance(spec, list) or spec[0] is None:
            continue
        missing = _missing_part(path, component)
        if missing:
            raise UserError(f"{path} is missing {missing}: copy the whole diffusers folder (model_index.json and "
                            "every folder it lists), or point checkpoint_path at a single checkpoint file.")
    unet = _read_json(os.path.join(path, "unet", "config.json"))
    scheduler = _read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    if unet.get("in_channels", 4) != 4:
        raise UserError(f"{path} is an inpainting checkpoint ({unet['in_channels']} input channels), which cannot "
                        "generate from noise alone; use the base model it was made from.")
    sd2_like = unet.get("cross_attention_dim") == 1024 or scheduler.get("prediction_type") == "v_prediction"
    if family == "sd15" and sd2_like:
        raise UserError(f"{path} is {OTHER_FAMILIES['v2']}; use an SD1.x or SDXL base checkpoint.")
    return family


def _missing_part(folder, component):
    """What a component's subfolder lacks ("its unet/ folder", ...), or None."""
    sub = os.path.join(folder, component)
    if not os.path.isdir(sub):
        return f"its {component}/ folder"
    names = set(os.listdir(sub))
    if component.startswith("tokenizer"):
        if "tokenizer.json" in names or {"vocab.json", "merges.txt"} <= names:
            return None
        return f"{component}/tokenizer.json (or vocab.json and merges.txt)"
    if component == "scheduler":
        return None if "scheduler_config.json" in names else "scheduler/scheduler_config.json"
    if "config.json" not in names:
        return f"{component}/config.json"
    if not any(n.endswith((".safetensors", ".bin")) for n in names):
        return f"the weights in {component}/ (a .safetensors file)"
    return None


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: copy the whole diffusers folder.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); copy it again from where the model came from.") from None


def _from_folder(path, family, dtype):
    """The folder's pipeline. Weights saved as pickled .bin files load too, as tensors only (diffusers and
    transformers read them with torch.load(weights_only=True)); one that holds more is refused."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .bin weights: "Defaulting to unsafe serialization", which is not so
    try:
        pipeline = PIPELINES[family].from_pretrained(path, dtype=dtype, local_files_only=True,
                                                     **_unused_components(family))
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise UserError(f"{path} has weights that cannot be loaded ({str(error).strip().splitlines()[0]}): a "
                        "component's file is damaged, truncated or a pickle holding more than tensors; get the "
                        "model's .safetensors files (or a single .safetensors checkpoint) again.") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    _refuse_missing_weights(path, pipeline)
    return pipeline


def _unused_components(family):
    if family == "sd15":
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {}


# ---------------------------------------------------------------- single files


def tensor_shapes(path):
    """{tensor name: shape} of a checkpoint file, read without loading a .safetensors file's weights."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise UserError(f"{path} is neither a diffusers folder nor a .safetensors or .ckpt checkpoint file.")
    not_weights = _not_weights(path)
    if not_weights:
        raise UserError(f"{path} cannot be read as a {suffix} file: it is not a checkpoint but {not_weights}; "
                        "download or copy the model again.")
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except (SafetensorError, OSError) as error:
            raise UserError(f"{path} cannot be read as a .safetensors file ({error}): it is truncated (an "
                            "interrupted download or copy?) or not a checkpoint; download or copy it again.") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        raise UserError(
            f"{path} is a pickled checkpoint holding more than weights (Python objects that loading would run as "
            "code), so it is not loaded; get the .safetensors release of the model, or convert this file once with "
            "a tool you trust (e.g. WebUI's Checkpoint Merger, saving as safetensors).") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as error:
        raise UserError(f"{path} cannot be read as a checkpoint ({str(error).splitlines()[0]}): it is truncated "
                        "or not a checkpoint; download or copy it again.") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a checkpoint's tensors.")
    return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}


def _not_weights(path):
    """What a file named as a checkpoint is instead ("an empty file", "an HTML page ..."), or None.

    Both formats start with bytes that are not text (safetensors: a little-endian header length, so NULs;
    torch: a zip's or a pickle's opcodes), so a start that reads as text is a page or a note saved under
    the model's name.
    """
    with open(path, "rb") as f:
        start = f.read(1024)
    if not start:
        return "an empty file (0 bytes: an interrupted download or copy?)"
    text = start.decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")  # "ignore": a character cut at 1024
    if not text or not all(c.isprintable() or c in "\t\r\n" for c in text):
        return None
    if "<html" in text.lower() or text.lower().startswith("<!doctype"):
        return "an HTML page (a web page saved in place of the download: a login, error or redirect page?)"
    if text.startswith("version https://git-lfs"):
        return "a Git LFS pointer (the repository was cloned without `git lfs pull`)"
    return f"a text file (it starts {text.splitlines()[0][:60]!r})"


def file_family(path):
    """"sd15" or "sdxl" from a checkpoint file's tensor names and shapes; anything else is a UserError."""
    shapes = tensor_shapes(path)

    def has(prefix):
        return any(key.startswith(prefix) for key in shapes)

    if not has("model.diffusion_model."):
        raise UserError(f"{path} is {_what_else(shapes)}, not a Stable Diffusion checkpoint (it has no "
                        "model.diffusion_model.* UNet weights); point checkpoint_path at a full SD1.x or SDXL "
                        "checkpoint.")
    # diffusers' own detection, run on shape-only tensors so that no weight is read
    try:
        model_type = infer_diffusers_model_type({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    except IndexError:  # it reads given dimensions of given tensors
        raise UserError(f"{path} has a tensor of the wrong rank among those that tell SD models apart: the file is "
                        "damaged or not a Stable Diffusion checkpoint; download it again.") from None
    if model_type == "v1" and has("cond_stage_model.model."):
        model_type = "v2"  # an OpenCLIP text encoder is SD2's, whatever the UNet's widths
    if model_type == "v1" and has("conditioner.embedders.1.model."):
        model_type = "xl_base"  # diffusers looks for the second text encoder's 10th layer; any depth is SDXL's
    if model_type in OTHER_FAMILIES:
        raise UserError(f"{path} is {OTHER_FAMILIES[model_type]}; use an SD1.x or SDXL base checkpoint.")
    if model_type == "xl_base":
        family, parts = "sdxl", {"conditioner.embedders.0.transformer.": "CLIP text encoder",
                                 "conditioner.embedders.1.model.": "OpenCLIP text encoder", "first_stage_model.": "VAE"}
    elif model_type == "v1":
        family, parts = "sd15", {"cond_stage_model.transformer.": "CLIP text encoder", "first_stage_model.": "VAE"}
    else:
        raise UserError(f"{path} is a {model_type} model, not an SD1.x or SDXL base checkpoint.")
    for prefix, part in parts.items():
        if not has(prefix):
            raise UserError(f"{path} holds a {FAMILY_NAMES[family]} UNet but no {part} ({prefix}* weights): "
                            "use a full checkpoint that includes it.")
    return family


def _what_else(shapes):
    keys = list(shapes)
    if any(k.startswith(("lora_unet_", "lora_te", "unet.", "transformer.")) or ".lora_" in k for k in keys):
        return "a LoRA"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "a VAE"
    if "emb_params" in keys or "string_to_param" in keys or "clip_l" in keys:
        return "a textual-inversion embedding"
    return f"a file of {len(keys)} tensors"


def config_folder(config, family):
    """The folder of diffusers configs to load a single file of `family` with: `config`, or ours."""
    if not config:
        return CONFIGS / family
    if not os.path.isfile(os.path.join(config, "model_index.json")):
        raise UserError(f"checkpoint_config={config!r} is not a diffusers folder (no model_index.json); give the "
                        "folder of the model the checkpoint was fine-tuned from, or leave it empty.")
    index = _read_json(os.path.join(config, "model_index.json"))
    if index.get("_class_name") != PIPELINES[family].__name__:
        raise UserError(f"checkpoint_config={config!r} holds a {index.get('_class_name')}, but the checkpoint is "
                        f"{FAMILY_NAMES[family]} ({PIPELINES[family].__name__}); give a folder of the same family.")
    return Path(config)


def clip_tokenizers(family):
    """CLIP's tokenizer from the vocabulary that comes with the project; SDXL's second one pads with "!"."""
    tokenizers = {"tokenizer": CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER), model_max_length=77)}
    if family == "sdxl":
        tokenizers["tokenizer_2"] = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER), model_max_length=77,
                                                                  pad_token="!")
    return tokenizers


def _from_single_file(path, family, folder, own_config, dtype):
    components = _unused_components(family)
    if not own_config:
        components.update(clip_tokenizers(family))  # ours; a checkpoint_config folder brings its own
    source = f"the configs in {folder}" if own_config else f"the {FAMILY_NAMES[family]} configs in {folder}"
    verbosity = diffusers_logging.get_verbosity()
    # its single-file model loader casts with .to(dtype) and then warns, with an empty list, about doing so
    diffusers_logging.set_verbosity_error()
    try:
        with _lower_case_suffix(path) as readable_path:
            # config= a local folder and local_files_only: diffusers would otherwise go to the Hub for them
            pipeline = PIPELINES[family].from_single_file(readable_path, config=str(folder), local_files_only=True,
                                                          dtype=dtype, **components)
    except (ValueError, RuntimeError, KeyError, OSError) as error:
        wrong_shape = WRONG_SHAPE.search(str(error))
        if wrong_shape:
            name, expected, found = wrong_shape.groups()
            raise UserError(f"{path} does not fit {source}: it has a tensor of shape {found} for {name}, where "
                            f"they need {expected}; the file is damaged or of another architecture: download it again, "
                            "or for a fine-tune with another architecture set checkpoint_config to a diffusers folder "
                            "of its base model.") from None
        raise UserError(f"{path} does not fit {source} ({str(error).strip().splitlines()[0]}); for a fine-tune "
                        "with another architecture set checkpoint_config to a diffusers folder of its base "
                        "model.") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    _refuse_missing_weights(path, pipeline)
    return pipeline


@contextlib.contextmanager
def _lower_case_suffix(path):
    """`path`, or a link to it named *.safetensors / *.ckpt in lower case: diffusers reads a file as safetensors
    only by its lower-case suffix, and WebUI users have MODEL.SAFETENSORS files too."""
    suffix = os.path.splitext(path)[1]
    if suffix == suffix.lower():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="checkpoint_") as folder:
        link = os.path.join(folder, "checkpoint" + suffix.lower())
        os.symlink(os.path.abspath(path), link)
        yield link


def _refuse_missing_weights(path, pipeline):
    """A file that lacks some of its model's tensors loads without an error in diffusers, those weights left
    empty ("meta"), and fails only at the first image; this names what it lacks instead."""
    for component, model in pipeline.components.items():
        if not isinstance(model, torch.nn.Module):
            continue
        missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
        if missing:
            raise UserError(f"{path} lacks {len(missing)} tensor(s) of its {component} (such as {missing[0]}): the "
                            "file is incomplete (an interrupted download, or a save that left parts out); download "
                            "the full checkpoint again.")
