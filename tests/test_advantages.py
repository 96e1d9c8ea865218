"""Advantages are as upstream's: rewards normalised over the epoch with torch's default (n - 1) std, then clipped."""

import numpy as np
import torch

from ddpo.ppo import compute_advantages


def test_advantages_are_rewards_normalised_with_the_sample_std_then_clipped():
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0])
    r = rewards.numpy().astype(np.float64)
    expected = (r - r.mean()) / (np.std(r, ddof=1) + 1e-8)  # upstream's (rewards - mean) / (rewards.std() + 1e-8)
    torch.testing.assert_close(compute_advantages(rewards, clip_max=100.0), torch.from_numpy(expected).float())
    clipped = compute_advantages(rewards, clip_max=1.0)
    torch.testing.assert_close(clipped, torch.from_numpy(np.clip(expected, -1.0, 1.0)).float())
    assert clipped.max() == 1.0 and clipped.min() < 0


def test_one_image_or_equal_rewards_give_zero_advantages_not_nan():
    assert compute_advantages(torch.tensor([0.7]), clip_max=5.0).tolist() == [0.0]
    assert compute_advantages(torch.tensor([2.0, 2.0, 2.0]), clip_max=5.0).tolist() == [0.0, 0.0, 0.0]
