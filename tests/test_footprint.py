"""The GPU-memory estimate (tools/footprint.py) counts on the meta device what a real run holds: the same
count of live tensor bytes, taken around a real forward and backward on the CPU, agrees with it."""

import pytest
import torch

from tools.footprint import training_activation_bytes
from tools.tiny_checkpoint import tiny_sdxl_unet, tiny_unet


@pytest.mark.parametrize("family, checkpointing", [("sd15", False), ("sd15", True), ("sdxl", True)])
def test_the_meta_count_matches_a_real_run(family, checkpointing):
    config = dict((tiny_unet() if family == "sd15" else tiny_sdxl_unet()).config)
    counts = {device: training_activation_bytes(config, 4, checkpointing, 2, 64, 64, torch.float32, device)
              for device in ("meta", "cpu")}
    assert counts["cpu"] > 0
    assert counts["meta"] == pytest.approx(counts["cpu"], rel=0.1)


def test_checkpointing_and_fewer_timesteps_per_call_need_less():
    config = dict(tiny_unet().config)

    def count(checkpointing, per_call):
        return training_activation_bytes(config, 4, checkpointing, per_call, 64, 64, torch.float32)

    without = count(False, 2)
    assert count(True, 2) < without and count(False, 1) < without
