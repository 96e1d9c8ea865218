"""The seed's reward model: a small CNN that scores a final latent directly (no VAE decode)."""

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from utils.cli import UserError
from utils.files import publish


class LatentRewardModel(nn.Module):
    """(batch, 4, h/8, w/8) latent -> (batch,) predicted score. Works for any latent size."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(8),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, 1024), nn.ReLU(), nn.Linear(1024, 1))

    def forward(self, latents):
        # MaxPool needs at least 8x8 latents (64 px images); smaller ones are padded up by the pooling.
        return self.head(self.features(latents.float())).squeeze(-1)


def save_reward_model(model, path, metadata):
    """Weights as safetensors (no pickle), `metadata` (JSON-able) in the file's header; temp file + rename."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path + ".tmp", metadata={"almostperfect": json.dumps(metadata)})
    publish(path + ".tmp", path)


def reward_model_metadata(path):
    """The metadata saved with the model (epoch, test metrics, latent_shape, ...), {} if there is none."""
    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get("almostperfect", "{}"))


FAMILY_NAMES = {"sd15": "SD1.x", "sdxl": "SDXL"}


def reward_model_family(path):
    """The model family whose latents the reward model learned; models saved before it was recorded: SD1.5."""
    return reward_model_metadata(path).get("family", "sd15")


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
    """The frozen reward model saved at `path`, in eval mode on `device`."""
    if not os.path.isfile(path):
        raise UserError(f"no reward model at {path}: train one first with `python train_reward.py`.")
    model = LatentRewardModel()
    model.load_state_dict(load_file(path))
    return model.to(device).eval().requires_grad_(False)
