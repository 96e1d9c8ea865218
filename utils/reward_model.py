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


class RewardEnsemble(nn.Module):
    """Several LatentRewardModels trained alike from different starts: their mean is the score, their
    disagreement (std across members) says where more ratings would teach the model most."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def member_scores(self, latents):
        """(batch, 4, h/8, w/8) -> (members, batch)."""
        return torch.stack([member(latents) for member in self.members])

    def forward(self, latents):
        return self.member_scores(latents).mean(0)


def member_scores(model, latents):
    """(members, batch) scores of a reward model or ensemble; a single model is one member."""
    return model.member_scores(latents) if isinstance(model, RewardEnsemble) else model(latents)[None]


def save_reward_model(model, path, metadata):
    """Weights as safetensors (no pickle), `metadata` (JSON-able) in the file's header; temp file + rename."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path + ".tmp", metadata={"almostperfect": json.dumps(metadata)})
    publish(path + ".tmp", path)


def reward_model_metadata(path):
    """The metadata saved with the model (epoch, test metrics, latent_shape, ...), {} if there is none."""
    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get("almostperfect", "{}"))


def load_reward_model(path, device="cpu"):
    """The frozen reward model saved at `path`, in eval mode on `device`: (b, 4, h/8, w/8) -> (b,) scores.

    A file saved from an ensemble (keys "members.<i>.…") loads as the RewardEnsemble, whose score is the mean.
    """
    if not os.path.isfile(path):
        raise UserError(f"no reward model at {path}: train one first with `python train_reward.py`.")
    state = load_file(path)
    size = len({key.split(".")[1] for key in state if key.startswith("members.")})
    model = RewardEnsemble([LatentRewardModel() for _ in range(size)]) if size else LatentRewardModel()
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)
