"""What every stage script does at its edges: read settings, turn bad input into one sentence.

The settings' values and their comments are config.py's; parsing `--name=value` overrides,
checking them against each other and `--help` are here, so config.py stays a page of values.
"""

import difflib
import errno
import importlib
import math
import os
import sys
import traceback
from types import ModuleType, SimpleNamespace

import torch
from tqdm.auto import tqdm

from ddpo.errors import TrainingDoesNotFit
from utils.errors import UserError
from utils.locks import LOCK_NAME
from utils.samples import HISTORY, LATENTS, RATING_ORDER_FILE, ROUND_FILE, is_image_name


class SettingsError(UserError, ValueError):
    """A setting is unknown, mistyped or contradicts another one; the message says which."""


MIN_IMAGE_SIZE = 64  # pixels: the reward CNN's three poolings need latents of at least 8x8
SCHEDULER_TRAINING_STEPS = 1000  # SD1.5's DDIM scheduler has 1000 noise levels; more steps than that repeat none
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # no room on the disk, over the quota, over the size limit
ROUND_OWN_NAMES = {HISTORY, LATENTS, ROUND_FILE, RATING_ORDER_FILE, LOCK_NAME}  # in sample_path, besides <seed>.png
BOOL_OR_AUTO = {"train_gradient_checkpointing"}  # True, False or "auto"
# Settings that name a file or folder: a leading ~ is the user's home, as in a shell (config.py and the
# command line alike; a quoted "--checkpoint_path=~/models/x.safetensors" reaches us unexpanded).
PATH_SETTINGS = ("sample_path", "score_path", "comparison_path", "model_path", "checkpoint_path", "checkpoint_config",
                 "reward_model_path", "lora_path", "generate_lora", "prompt_file", "rank_folder")
# A file inside a folder setting follows that folder when only the folder is overridden on the command line.
FOLLOWS = {"score_path": ("sample_path", "scores.json"), "comparison_path": ("sample_path", "comparisons.json"),
           "reward_model_path": ("model_path", "reward_model.safetensors")}
# train_reward_recipe: values for the reward-training settings; "upstream" is config.py's, "few_ratings" what
# tools/benchmark_ratings.py measured best below ~1000 ratings (docs/rating-efficiency.md). Both keep the split.
REWARD_RECIPES = {
    "upstream": {"train_reward_loss": "mse", "train_reward_batch_size": 100, "train_reward_learning_rate": 1e-3},
    "few_ratings": {"train_reward_loss": "ranking", "train_reward_batch_size": 32, "train_reward_learning_rate": 3e-3},
}


# The type of each setting's value, which config.py's values must have too: config.py is edited by hand, and a
# "32" for 32 would otherwise surface as a TypeError deep inside a stage. Settings not listed take any type.
INTEGERS = {"lora_rank", "generate_sample_size", "generate_batch_size", "height", "width", "num_inference_steps",
            "score_port", "train_reward_num_epochs", "train_reward_batch_size", "train_reward_ensemble_size",
            "train_policy_num_epochs", "train_save_freq", "train_sample_batch_size",
            "train_sample_num_batches_per_epoch", "train_policy_batch_size", "train_optimizer_steps_per_epoch",
            "train_timesteps_per_call", "seed", "train_images_per_prompt"}
NUMBERS = {"guidance_scale", "eta", "train_reward_test_split_ratio", "train_reward_learning_rate",
           "train_reward_min_correlation", "train_policy_learning_rate", "train_adv_clip_max", "train_clip_range",
           "train_timestep_fraction", "train_kl_weight", "train_kl_fraction", "train_reward_pessimism"}
BOOLEANS = {"generate_vae_slicing", "generate_vae_tiling", "score_open_browser", "train_reward_use_history",
            "train_reward_flip_augment", "train_offload_frozen", "train_compile"}
TEXTS = {"sample_path", "score_path", "comparison_path", "model_path", "checkpoint_path", "checkpoint_config",
         "reward_model_path", "lora_path", "lora_name_prefix", "device", "mixed_precision", "attention_backend",
         "generate_lora", "prompt", "prompt_file", "negative_prompt", "score_host", "train_reward_loss", "rank_folder",
         "train_preview_seeds", "train_reward_recipe",
         "train_advantage_baseline", "train_preview_prompts"}


def _config():
    """The config module; a config.py that Python cannot run (a typo, bytes that are not UTF-8) is one sentence."""
    try:
        return importlib.import_module("config")
    except Exception as error:  # SyntaxError, NameError, ...: whatever the edit broke
        frames = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
                  if os.path.basename(frame.filename) == "config.py"]
        line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else (frames or [None])[-1]
        where, why = f" on line {line}" if line else "", getattr(error, "msg", None) or error
        raise SettingsError(f"config.py cannot be read ({type(error).__name__}{where}: {why}): fix that line, "
                            "or restore config.py from git.") from None


def defaults():
    """{name: value} of every setting in config.py, read now so that edits made by importers count."""
    values = {k: v for k, v in vars(_config()).items()
              if not k.startswith("_") and not callable(v) and not isinstance(v, ModuleType)}
    check_config_types(values)
    return values


def _type_problem(name, value):
    """What is wrong with `value` as the setting `name`'s value, or None (an int where a number goes is fine)."""
    if name in INTEGERS and (type(value) is not int):
        return "a whole number"
    if name in NUMBERS and (type(value) not in (int, float)):
        return "a number"
    if name in BOOLEANS and type(value) is not bool:
        return "True or False"
    if name in BOOL_OR_AUTO and not (type(value) is bool or value == "auto"):
        return 'True, False or "auto"'
    if name in TEXTS and not isinstance(value, str):
        return "text in quotes"
    return None


def check_config_types(values):
    """config.py's own values against each setting's type, and none of them missing: one sentence naming
    config.py and the setting."""
    for name in sorted(INTEGERS | NUMBERS | BOOLEANS | BOOL_OR_AUTO | TEXTS):
        if name not in values:
            raise SettingsError(f"config.py has no setting {name}: put back its line (see config.py in git).")
        problem = _type_problem(name, values[name])
        if problem:
            raise SettingsError(f"config.py sets {name} = {values[name]!r}, which is not {problem}: fix that line "
                                "of config.py.")
        if name in NUMBERS:
            values[name] = float(values[name])


def _parse_bool(name, text):
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise SettingsError(f"--{name} takes True or False, not {text!r}.")


def _parse_bool_or_auto(name, value):
    """True, False or "auto", from config.py's value or the command line's text."""
    if isinstance(value, bool):
        return value
    if str(value).lower() == "auto":
        return "auto"
    try:
        return _parse_bool(name, str(value))
    except SettingsError:
        raise SettingsError(f"--{name} takes auto, True or False, not {value!r}.") from None


def _parse_value(name, text, default):
    if name in BOOL_OR_AUTO:
        return _parse_bool_or_auto(name, text)
    if isinstance(default, bool):
        return _parse_bool(name, text)
    for kind, what in ((int, "a whole number"), (float, "a number")):
        if isinstance(default, kind):
            try:
                value = kind(text)
            except ValueError:
                raise SettingsError(f"--{name} takes {what} (default {default}), not {text!r}.") from None
            if not math.isfinite(value):
                raise SettingsError(f"--{name} must be a finite number, not {text!r}.")
            return value
    return text


def _unknown(name, known):
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else " Run with --help for the list."
    return SettingsError(f"Unknown setting --{name}.{hint}")


def parse_settings(argv, used=None):
    """Settings from config.py's values and --name=value overrides in argv, validated.

    `used` lists the settings the calling stage reads; --help prints those and exits.
    """
    values = defaults()
    types = dict(values)
    overridden, wants_help = set(), False
    for arg in argv:
        if arg in ("-h", "--help"):
            wants_help = True
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise SettingsError(f"Arguments look like --name=value; {arg!r} does not.")
        name, text = arg[2:].split("=", 1)
        if name not in values:
            raise _unknown(name, values)
        values[name] = _parse_value(name, text, types[name])
        overridden.add(name)
    for name in BOOL_OR_AUTO:  # config.py may hold True, False or "auto"
        values[name] = _parse_bool_or_auto(name, values[name])
    for name, (folder, file_name) in FOLLOWS.items():
        if folder in overridden and name not in overridden:
            values[name] = os.path.join(values[folder], file_name)
    for name in PATH_SETTINGS:
        values[name] = os.path.expanduser(values[name])
    apply_reward_recipe(values, overridden)
    if wants_help:  # after the recipe, so that --help shows the values the stage would use
        print_help(values, used)
        sys.exit(0)
    settings = SimpleNamespace(**values)
    validate_settings(settings)
    return settings


def apply_reward_recipe(values, overridden):
    """Set train_reward_recipe's values where a setting is still upstream's: a --flag or a config.py edit wins."""
    recipe = REWARD_RECIPES.get(values["train_reward_recipe"])
    if recipe is None:
        raise SettingsError(f"train_reward_recipe must be {' or '.join(map(repr, REWARD_RECIPES))} "
                            f"(got {values['train_reward_recipe']!r}).")
    for name, value in recipe.items():
        if name not in overridden and values[name] == REWARD_RECIPES["upstream"][name]:
            values[name] = value


def follows_recipe(settings, recipe):
    """Whether the reward-training settings are exactly that recipe's."""
    return all(getattr(settings, name) == value for name, value in REWARD_RECIPES[recipe].items())


def stage_paths(folder, checkpoint=None):
    """Every path setting inside `folder`, as a user's folder has them: {setting name: path}.

    checkpoint_path is `checkpoint`, or folder/models/checkpoint when None.
    """
    return {
        "checkpoint_path": str(checkpoint or os.path.join(folder, "models", "checkpoint")),
        "sample_path": os.path.join(folder, "samples", ""),
        "score_path": os.path.join(folder, "samples", "scores.json"),
        "comparison_path": os.path.join(folder, "samples", "comparisons.json"),
        "model_path": os.path.join(folder, "models", ""),
        "reward_model_path": os.path.join(folder, "models", "reward_model.safetensors"),
        "lora_path": os.path.join(folder, "outputs", ""),
    }


def _is_utf8(text):
    """Whether `text` is valid Unicode: bytes of the command line that are not UTF-8 arrive as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def seed_list(text, name):
    """[int, ...] from "0,1,2,3" ("" = none); SettingsError naming the setting otherwise."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SettingsError(f"{name} must be whole numbers separated by commas (got {text!r}).") from None
    if any(seed < 0 for seed in seeds):
        raise SettingsError(f"{name} must be seeds of 0 or more (got {text!r}).")
    return seeds


def images_per_epoch(s):
    return s.train_sample_batch_size * s.train_sample_num_batches_per_epoch


def images_per_prompt(s):
    """Images of each prompt group of a training epoch: train_images_per_prompt, 0 meaning all of them."""
    return s.train_images_per_prompt or images_per_epoch(s)


def trained_timesteps(num_inference_steps, timestep_fraction):
    """How many of an image's DDIM steps an epoch trains on."""
    return max(1, int(num_inference_steps * timestep_fraction))


def validate_settings(s, num_processes=1):
    """Fail on contradictory settings with one sentence, before any model is loaded."""
    for name, value in vars(s).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"{name} must be a finite number (got {value}).")
        if isinstance(value, str) and not _is_utf8(value):
            raise SettingsError(f"{name} is not valid UTF-8 text ({value.encode('utf-8', 'surrogateescape')!r}): "
                                "write it in UTF-8 (your terminal's or editor's encoding setting).")
    if s.eta <= 0:
        raise SettingsError(f"eta must be > 0 (got {s.eta}): with eta = 0 DDIM is deterministic and DDPO's "
                            "log-probabilities are undefined.")
    for name in ("height", "width"):
        if getattr(s, name) <= 0 or getattr(s, name) % 8:
            raise SettingsError(f"{name} must be a positive multiple of 8 (got {getattr(s, name)}), since latents "
                                "are 1/8 of the image size.")
        if getattr(s, name) < MIN_IMAGE_SIZE:
            raise SettingsError(f"{name} must be at least {MIN_IMAGE_SIZE} (got {getattr(s, name)}): the reward model "
                                f"needs latents of at least {MIN_IMAGE_SIZE // 8}x{MIN_IMAGE_SIZE // 8}.")
    if s.num_inference_steps > SCHEDULER_TRAINING_STEPS:
        raise SettingsError(f"num_inference_steps must be at most {SCHEDULER_TRAINING_STEPS} "
                            f"(got {s.num_inference_steps}), "
                            "the number of noise levels SD1.5's scheduler was trained with.")
    if s.seed < 0:
        raise SettingsError(f"seed must be 0 or more (got {s.seed}).")
    seed_list(s.train_preview_seeds, "train_preview_seeds")
    check_folder_layout(s)
    for name in ("generate_sample_size", "generate_batch_size", "num_inference_steps", "train_reward_num_epochs",
                 "train_reward_batch_size", "train_reward_ensemble_size", "train_policy_num_epochs", "train_save_freq",
                 "train_sample_batch_size",
                 "train_sample_num_batches_per_epoch", "train_policy_batch_size", "train_optimizer_steps_per_epoch",
                 "lora_rank"):
        if getattr(s, name) < 1:
            raise SettingsError(f"{name} must be at least 1 (got {getattr(s, name)}).")
    if s.train_timesteps_per_call < 0:
        raise SettingsError("train_timesteps_per_call must be 0 (auto) or at least 1 "
                            f"(got {s.train_timesteps_per_call}).")
    per_process = images_per_epoch(s) // num_processes
    if images_per_epoch(s) % num_processes or per_process % s.train_policy_batch_size:
        processes = f" on {num_processes} processes ({per_process} each)" if num_processes > 1 else ""
        raise SettingsError(
            f"train_sample_batch_size x train_sample_num_batches_per_epoch = {images_per_epoch(s)} images per epoch"
            f"{processes} must be divisible by train_policy_batch_size = {s.train_policy_batch_size}.")
    minibatches = per_process // s.train_policy_batch_size
    if minibatches % s.train_optimizer_steps_per_epoch:
        raise SettingsError(
            f"train_optimizer_steps_per_epoch = {s.train_optimizer_steps_per_epoch} must divide the epoch's "
            f"{minibatches} minibatches of train_policy_batch_size = {s.train_policy_batch_size} image(s)"
            f"{' per process' if num_processes > 1 else ''}, so every step learns from as many images.")
    if s.train_images_per_prompt < 0 or images_per_epoch(s) % images_per_prompt(s):
        raise SettingsError(
            f"train_images_per_prompt = {s.train_images_per_prompt} must divide the {images_per_epoch(s)} images per "
            f"epoch (train_sample_batch_size x train_sample_num_batches_per_epoch), so every prompt has as many; "
            f"0 = all of them.")
    if s.train_advantage_baseline not in ("epoch", "prompt"):
        raise SettingsError(f"train_advantage_baseline must be 'epoch' or 'prompt' "
                            f"(got {s.train_advantage_baseline!r}).")
    if s.train_advantage_baseline == "prompt" and images_per_prompt(s) < 2:
        raise SettingsError("train_advantage_baseline = 'prompt' compares each image with the other images of its "
                            "prompt, so it needs train_images_per_prompt of at least 2 (with 1 every advantage is 0).")
    if not 0 < s.train_timestep_fraction <= 1:
        raise SettingsError(f"train_timestep_fraction must be in (0, 1] (got {s.train_timestep_fraction}).")
    if not 0 <= s.train_reward_test_split_ratio < 1:
        raise SettingsError(f"train_reward_test_split_ratio must be in [0, 1) (got {s.train_reward_test_split_ratio}).")
    if s.train_reward_loss not in ("mse", "ranking"):
        raise SettingsError(f"train_reward_loss must be 'mse' or 'ranking' (got {s.train_reward_loss!r}).")
    if s.train_clip_range <= 0 or s.train_adv_clip_max <= 0:
        raise SettingsError("train_clip_range and train_adv_clip_max must be > 0.")
    for name in ("train_kl_weight", "train_reward_pessimism"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{name} must be 0 (off) or more (got {getattr(s, name)}): a negative one would reward "
                                "drifting from the base model or the reward models' disagreement.")
    if not 0 <= s.train_kl_fraction <= 1:
        raise SettingsError(f"train_kl_fraction must be in [0, 1] (got {s.train_kl_fraction}): the share of each "
                            "epoch's images the KL to the base model is measured on, 0 for none.")
    if s.train_kl_weight and not s.train_kl_fraction:
        raise SettingsError(f"train_kl_weight = {s.train_kl_weight} penalises the KL to the base model, which "
                            "train_kl_fraction = 0 does not measure: set train_kl_fraction above 0 (e.g. 0.25).")
    if s.mixed_precision not in ("auto", "fp16", "bf16", "no"):
        raise SettingsError(f"mixed_precision must be auto, fp16, bf16 or no (got {s.mixed_precision!r}).")
    if set(s.lora_name_prefix) & set('/\\:<>"|?*'):
        raise SettingsError("lora_name_prefix must be usable in a file name and in WebUI's <lora:NAME:1> tag: "
                            "no / \\ : < > \" | ? * "
                            f"(got {s.lora_name_prefix!r}).")
    if s.attention_backend not in ("sdpa", "xformers"):
        raise SettingsError(f"attention_backend must be 'sdpa' or 'xformers' (got {s.attention_backend!r}).")
    if not s.device.startswith(("cuda", "cpu", "mps")):
        raise SettingsError(f"device must be cuda, cuda:N, cpu or mps (got {s.device!r}).")
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"device is {s.device!r} but PyTorch sees no CUDA GPU; use --device=cpu or install a "
                            "CUDA build of torch.")


def _real(path):
    return os.path.realpath(os.path.expanduser(path))


def _inside(path, folder):
    """Whether `path` is `folder` or lies anywhere below it (links resolved)."""
    return os.path.commonpath([_real(path), _real(folder)]) == _real(folder)


def check_folder_layout(s):
    """Refuse layouts in which a stage would move, overwrite or lose what another stage or the person keeps.

    The stages' folders (sample_path, model_path, lora_path) and the checkpoint lie apart: generate moves
    a round out of sample_path, and a folder inside another would be taken for part of it. The one nesting
    allowed is the default's, the checkpoint in model_path (train_reward writes only its own files there).
    The ratings lie directly in sample_path, so that they move to history/ with their round, under names of
    their own.
    """
    folders = ("sample_path", "model_path", "lora_path")
    for index, name in enumerate(folders):
        for other in folders[index + 1:]:
            if _inside(getattr(s, name), getattr(s, other)) or _inside(getattr(s, other), getattr(s, name)):
                raise SettingsError(f"{name} {getattr(s, name)!r} and {other} {getattr(s, other)!r} overlap (one is "
                                    f"in the other): each stage needs a folder of its own; give them separate folders.")
        folder = getattr(s, name)
        if _inside(folder, s.checkpoint_path) or (name != "model_path" and _inside(s.checkpoint_path, folder)):
            raise SettingsError(f"checkpoint_path {s.checkpoint_path!r} and {name} {folder!r} overlap (one is in the "
                                f"other): keep the checkpoint out of the stages' folders (model_path may hold it).")
    for name in ("score_path", "comparison_path"):
        path = getattr(s, name)
        if _real(os.path.dirname(os.path.abspath(path))) != _real(s.sample_path):
            raise SettingsError(
                f"{name} {path!r} must be a file directly in sample_path {s.sample_path!r}: a round's ratings "
                f"move to history/ with its images, and ratings elsewhere would be left behind.")
        if os.path.basename(path) in ROUND_OWN_NAMES or is_image_name(os.path.basename(path)):
            raise SettingsError(f"{name} {path!r} has the name of a file or folder the round keeps in sample_path "
                                f"({', '.join(sorted(ROUND_OWN_NAMES))}, <seed>.png): give it another name.")
    if _real(s.score_path) == _real(s.comparison_path):
        raise SettingsError(f"score_path and comparison_path are the same file {s.score_path!r}: the one would "
                            "overwrite the other; give them different names.")


def print_help(values, used):
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "stage"
    doc = (sys.modules["__main__"].__doc__ or "").strip()
    if doc:
        print(doc + "\n")
    print(f"Settings of {script} (edit config.py or pass --name=value):")
    for name in used or values:
        print(f"  --{name}={values[name]}")


def end_progress_bars():
    """Close the progress bars an error interrupted, so that its sentence starts a line of its own."""
    for bar in list(tqdm._instances):
        bar.close()


def run_stage(main, used_settings):
    """Call main(settings) with the command line's settings; bad input exits with one line, not a traceback."""
    try:
        settings = parse_settings(sys.argv[1:], used_settings)
        try:
            main(settings)
        except BaseException:
            end_progress_bars()
            raise
    except (UserError, TrainingDoesNotFit) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError as error:
        print(f"error: the GPU ran out of memory ({str(error).splitlines()[0]}). Lower generate_batch_size or "
              f"train_sample_batch_size, or height and width; train_timesteps_per_call=0 and "
              f"train_gradient_checkpointing=auto make training fit by themselves. Everything saved so far is kept.",
              file=sys.stderr)
        sys.exit(1)
    except OSError as error:
        if error.errno in DISK_FULL:
            print(f"error: no space left to write {error.filename or 'a file'} ({error.strerror}): free some disk "
                  "space and run the same command again; everything saved before is kept.", file=sys.stderr)
            sys.exit(1)
        if error.filename is None:  # not about a path of the user's: a bug, whose traceback helps
            raise
        print(f"error: cannot use {error.filename} ({error.strerror}): check that path and its permissions "
              "(a file where a folder should be, or the other way round?).", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: everything saved so far is kept; run the same command again to go on.", file=sys.stderr)
        sys.exit(130)
