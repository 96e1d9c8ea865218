"""Every setting of AlmostPerfect, with its default.

Edit the values here, or override any of them on a stage's command line as --name=value
(e.g. `python generate.py --generate_sample_size=100 --prompt="a red car"`). An override is
checked against the default's type; an unknown name is an error that suggests the closest
ones. `python <stage>.py --help` lists the settings that stage uses, with their values.
"""

import difflib
import os
import sys
from types import SimpleNamespace

import torch

# ---------------------------------------------------------------- paths
sample_path = "samples/"  # the current round: <seed>.png, latents/, scores.json; history/ holds earlier rounds
score_path = "samples/scores.json"  # {"<seed>.png": score in -5..+5}, the seed WebApp's format
model_path = "models/"  # reward model and its metrics are written here
checkpoint_path = "models/checkpoint"  # diffusers-format SD1.5 folder (model_index.json, unet/, vae/, ...)
reward_model_path = "models/reward_model.safetensors"  # latent CNN weights (+ .json with its metadata)
lora_path = "outputs/"  # LoRAs (diffusers and WebUI/kohya format), optimizer state, metrics, plots

# ---------------------------------------------------------------- model
lora_rank = 32  # rank r of the UNet LoRA; lora_alpha = r, so WebUI applies it at scale 1
device = "cuda" if torch.cuda.is_available() else "cpu"  # fp16 weights + fp32 LoRA on cuda, fp32 on cpu
attention_backend = "sdpa"  # "sdpa" (PyTorch's fused attention) or "xformers" (if installed)

# ---------------------------------------------------------------- generation (stage 1, and the policy's sampler)
generate_sample_size = 1000  # images per round
generate_batch_size = 4  # images per pipeline call; raise it until memory runs out
generate_lora = "latest"  # "latest" = newest outputs/diffusers_lora_epoch_N.safetensors, "none", or a file path
generate_vae_slicing = True  # decode a batch one image at a time: same images, a fraction of the VAE's memory
generate_vae_tiling = False  # decode in tiles: needed only far above 1024 px on small GPUs; may show faint seams
prompt = "a neon sign"
negative_prompt = "worst quality, low quality"
height = 1080  # pixels, a multiple of 8 (latents are height/8 x width/8)
width = 720  # pixels, a multiple of 8
num_inference_steps = 20  # DDIM steps per image
guidance_scale = 5.0  # classifier-free guidance; 1 turns it off
eta = 1.0  # DDIM noise (0 = deterministic); DDPO needs eta > 0 for its log-probabilities

# ---------------------------------------------------------------- rating page (stage 2)
score_host = "127.0.0.1"  # address the page listens on; anything but loopback lets the network see and change your ratings
score_port = 7870  # if taken, any free port is used (0 = always any free port); not 7860, which is WebUI's
score_open_browser = True  # open the page in the default browser at start

# ---------------------------------------------------------------- reward model (stage 3)
train_reward_num_epochs = 10
train_reward_batch_size = 100
train_reward_test_split_ratio = 0.1  # share of the ratings held out to measure the model (fixed shuffle seed)
train_reward_learning_rate = 1e-3  # AdamW
train_reward_use_history = True  # also learn from rated rounds in samples/history/
train_reward_flip_augment = True  # random horizontal flips of training latents (a mirrored image is rated the same)
train_reward_min_correlation = 0.3  # below this test-set Pearson correlation, warn that the model is not worth a policy
rank_folder = ""  # a folder of images: train_reward.py ranks it with the trained model (best first) instead of training

# ---------------------------------------------------------------- policy, DDPO (stage 4)
train_policy_num_epochs = 50  # the run stops at this epoch number, counting epochs of earlier (resumed) runs
train_save_freq = 10  # save LoRA + optimizer state every N epochs (and after the last)
train_sample_batch_size = 4  # images per sampling call
train_sample_num_batches_per_epoch = 4  # sampling calls per epoch: an epoch learns from batch_size x num_batches images
train_policy_batch_size = 1  # images per optimizer step and process (accelerate, N processes: a step learns from N x this)
train_policy_learning_rate = 1e-4  # AdamW on the LoRA weights
train_adv_clip_max = 2.0  # advantages (normalised rewards) are clipped to +-this
train_clip_range = 1e-4  # PPO ratio clip range
train_timestep_fraction = 1.0  # train on this random share of each image's timesteps (1.0 = all, the seed's behaviour)
train_timesteps_per_call = 0  # timesteps per UNet call in training (same gradient); 0 = auto: as many as fit
train_gradient_checkpointing = "auto"  # recompute activations: 1/4 the memory, +1/3 compute; auto = only if needed
train_offload_frozen = True  # keep text encoder and VAE off the GPU while training (they are not needed there)
train_compile = False  # torch.compile the UNet (slow first epoch, faster later ones)
train_preview_seeds = "0,1,2,3"  # fixed seeds of the preview grid written at each save ("" = no previews)
seed = 0  # seeds the policy's sampling noise and shuffles, so a run (and its resume) is reproducible

_BOOL_OR_AUTO = {"train_gradient_checkpointing"}  # True, False or "auto"
# A file inside a folder setting follows that folder when only the folder is overridden on the command line.
_FOLLOWS = {"score_path": ("sample_path", "scores.json"), "reward_model_path": ("model_path", "reward_model.safetensors")}
_DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))}


class SettingsError(ValueError):
    """A setting is unknown, mistyped or contradicts another one; the message says which."""


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
    if name in _BOOL_OR_AUTO:
        return text  # parse() reads it, as it reads config.py's value
    if isinstance(default, bool):
        return _parse_bool(name, text)
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise SettingsError(f"--{name} takes a whole number (default {default}), not {text!r}.") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise SettingsError(f"--{name} takes a number (default {default}), not {text!r}.") from None
    return text


def _unknown(name):
    close = difflib.get_close_matches(name, _DEFAULTS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else " Run with --help for the list."
    return SettingsError(f"Unknown setting --{name}.{hint}")


def parse(argv, used=None):
    """Settings from config.py's values and --name=value overrides in argv, validated.

    `used` lists the settings the calling stage reads; --help prints those and exits.
    """
    values = {k: globals()[k] for k in _DEFAULTS}  # re-read so edits made by tests/importers count
    overridden = set()
    for arg in argv:
        if arg in ("-h", "--help"):
            print_help(values, used)
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise SettingsError(f"Arguments look like --name=value; {arg!r} does not.")
        name, text = arg[2:].split("=", 1)
        if name not in values:
            raise _unknown(name)
        values[name] = _parse_value(name, text, _DEFAULTS[name])
        overridden.add(name)
    for name in _BOOL_OR_AUTO:  # config.py may hold True, False or "auto"
        values[name] = _parse_bool_or_auto(name, values[name])
    for name, (folder, file_name) in _FOLLOWS.items():
        if folder in overridden and name not in overridden:
            values[name] = os.path.join(values[folder], file_name)
    settings = SimpleNamespace(**values)
    validate(settings)
    return settings


def validate(s):
    """Fail on contradictory settings with one sentence, before any model is loaded."""
    if s.eta <= 0:
        raise SettingsError(f"eta must be > 0 (got {s.eta}): with eta = 0 DDIM is deterministic and DDPO's log-probabilities are undefined.")
    for name in ("height", "width"):
        if getattr(s, name) <= 0 or getattr(s, name) % 8:
            raise SettingsError(f"{name} must be a positive multiple of 8 (got {getattr(s, name)}), since latents are 1/8 of the image size.")
    for name in ("generate_sample_size", "generate_batch_size", "num_inference_steps", "train_reward_num_epochs",
                 "train_reward_batch_size", "train_policy_num_epochs", "train_save_freq", "train_sample_batch_size",
                 "train_sample_num_batches_per_epoch", "train_policy_batch_size", "lora_rank"):
        if getattr(s, name) < 1:
            raise SettingsError(f"{name} must be at least 1 (got {getattr(s, name)}).")
    if s.train_timesteps_per_call < 0:
        raise SettingsError(f"train_timesteps_per_call must be 0 (auto) or at least 1 (got {s.train_timesteps_per_call}).")
    samples_per_epoch = s.train_sample_batch_size * s.train_sample_num_batches_per_epoch
    if samples_per_epoch % s.train_policy_batch_size:
        raise SettingsError(
            f"train_sample_batch_size x train_sample_num_batches_per_epoch = {samples_per_epoch} images per epoch "
            f"must be divisible by train_policy_batch_size = {s.train_policy_batch_size}.")
    if not 0 < s.train_timestep_fraction <= 1:
        raise SettingsError(f"train_timestep_fraction must be in (0, 1] (got {s.train_timestep_fraction}).")
    if not 0 <= s.train_reward_test_split_ratio < 1:
        raise SettingsError(f"train_reward_test_split_ratio must be in [0, 1) (got {s.train_reward_test_split_ratio}).")
    if s.train_clip_range <= 0 or s.train_adv_clip_max <= 0:
        raise SettingsError("train_clip_range and train_adv_clip_max must be > 0.")
    if s.attention_backend not in ("sdpa", "xformers"):
        raise SettingsError(f"attention_backend must be 'sdpa' or 'xformers' (got {s.attention_backend!r}).")
    if not s.device.startswith(("cuda", "cpu", "mps")):
        raise SettingsError(f"device must be cuda, cuda:N, cpu or mps (got {s.device!r}).")
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"device is {s.device!r} but PyTorch sees no CUDA GPU; use --device=cpu or install a CUDA build of torch.")


def print_help(values, used):
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "stage"
    doc = (sys.modules["__main__"].__doc__ or "").strip()
    if doc:
        print(doc + "\n")
    print(f"Settings of {script} (edit config.py or pass --name=value):")
    for name in used or values:
        print(f"  --{name}={values[name]}")
