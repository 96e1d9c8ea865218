"""The reward model on disk: save and load it (safetensors, no pickle), its metadata and model family."""

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ddpo.reward_model import LatentRewardModel, RewardEnsemble
from utils.errors import UserError
from utils.families import FAMILY_NAMES
from utils.files import writing


def save_reward_model(model, path, metadata):
    """Weights as safetensors (no pickle), `metadata` (JSON-able) in the file's header; temp file + rename."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with writing(path) as temp_path:
        save_file(state, temp_path, metadata={"almostperfect": json.dumps(metadata)})


def _unreadable(path, why):
    return UserError(f"{path} is {why}: train it again with `python train_reward.py` (or point "
                     "--reward_model_path at a model it saved).")


def reward_model_metadata(path):
    """The metadata saved with the model (epoch, test metrics, latent_shape, ...), {} if there is none."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = json.loads((f.metadata() or {}).get("almostperfect", "{}"))
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, f"not a reward model saved by train_reward.py ({error})") from None
    if not isinstance(metadata, dict):
        return {}
    shape = metadata.get("latent_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(n) is int and n > 0 for n in shape)):
        metadata.pop("latent_shape", None)  # written by hand or by another program: not to be trusted
    return metadata


def reward_model_family(path):
    """The model family whose latents the reward model learned; models saved before it was recorded: SD1.5."""
    family = reward_model_metadata(path).get("family", "sd15")
    if not isinstance(family, str) or family not in FAMILY_NAMES:  # JSON: could be a list, which no dict holds
        raise _unreadable(path, f"a reward model of a model family {family!r} that is neither "
                                f"{' nor '.join(FAMILY_NAMES)}")
    return family


def check_family(path, family, latents_of):
    """Refuse to score latents of another model family than the reward model learned: both have 4 channels,
    so nothing else would notice, and its scores would mean nothing."""
    trained = reward_model_family(path)
    if trained != family:
        raise UserError(
            f"the reward model {path} learned {FAMILY_NAMES[trained]} latents and cannot score {latents_of}, which "
            f"are {FAMILY_NAMES[family]}: train one on ratings of this model's images (generate.py, score.py, "
            f"train_reward.py), or set reward_model_path to one trained for {FAMILY_NAMES[family]}.")


def load_reward_model(path, device="cpu"):
    """The frozen reward model saved at `path`, in eval mode on `device`: (b, 4, h/8, w/8) -> (b,) scores.

    A file saved from an ensemble (keys "members.<i>.…") loads as the RewardEnsemble, whose score is the mean.
    UserError if the file is not one.
    """
    if not os.path.isfile(path):
        raise UserError(f"no reward model at {path}: train one first with `python train_reward.py`.")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as error:  # truncated, garbage, a pickle (.pt) or another format
        raise _unreadable(path, f"not a safetensors file ({error})") from None
    size = len({key.split(".")[1] for key in state if key.startswith("members.")})
    model = RewardEnsemble([LatentRewardModel() for _ in range(size)]) if size else LatentRewardModel()
    try:
        model.load_state_dict(state)
    except RuntimeError:  # other keys or shapes: another model's weights
        raise _unreadable(path, "not the weights of this reward model (other names or shapes)") from None
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise _unreadable(path, "holding NaN or infinite weights")
    return model.to(device).eval().requires_grad_(False)
