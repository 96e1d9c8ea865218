"""The upstream project's reward model: a small CNN that scores a final latent directly (no VAE decode), and
an ensemble of them whose members' disagreement says where the reward is a guess."""

import torch
from torch import nn

MIN_LATENT_SIZE = 8  # three 2x poolings: smaller latents (images under 64 px) shrink to nothing


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
        # At least MIN_LATENT_SIZE per side; AdaptiveAvgPool then brings any size to 8x8.
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


def pessimistic_reward(scores, pessimism):
    """(members, batch) scores -> (batch,) mean - pessimism x std over the members (population std, so one
    member is its own score): a reward that counts only what the CNNs agree on (Coste et al., ICLR'24)."""
    return scores.mean(0) - pessimism * scores.std(0, correction=0) if pessimism else scores.mean(0)
