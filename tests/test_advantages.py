"""Advantages are the epoch's rewards normalised as ddpo-pytorch does (population std), then clipped."""

import numpy as np
import torch

from utils.ddpo import compute_advantages


def test_advantages_are_rewards_normalised_with_the_population_std_then_clipped():
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0])
    expected = (rewards.numpy() - rewards.numpy().mean()) / (np.std(rewards.numpy()) + 1e-8)  # ddpo-pytorch's rule
    torch.testing.assert_close(compute_advantages(rewards, clip_max=100.0), torch.from_numpy(expected))
    clipped = compute_advantages(rewards, clip_max=1.0)  # 10.0 is 1.92 std above the mean, 0.0 is 0.90 below
    torch.testing.assert_close(clipped, torch.from_numpy(expected).clamp(-1.0, 1.0))
    assert clipped[-1] == 1.0 and -1.0 < clipped[0] < -0.8


def test_a_single_image_or_equal_rewards_give_zero_advantage_not_nan():
    assert compute_advantages(torch.tensor([0.7]), clip_max=5.0).tolist() == [0.0]
    assert compute_advantages(torch.tensor([2.0, 2.0, 2.0]), clip_max=5.0).tolist() == [0.0, 0.0, 0.0]
