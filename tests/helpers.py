"""Builders that several test modules share (the fixtures and stage runners are in conftest.py)."""

import json
import os

import torch
from PIL import Image

import generate
from conftest import TINY_SETTINGS
from utils.cli import parse_settings, stage_paths
from utils.files import write_json_atomic
from utils.samples import latent_file, save_latent

PLANNED_SEEDS = [11, 22, 33, 44, 55, 66]
DEAD_HUB = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # any attempt to reach a hub fails at once


def planned_round(folder, checkpoint, *args):
    """round.json with PLANNED_SEEDS for generate's settings in `folder`, so that two runs make the same images."""
    command_line = {**stage_paths(folder, checkpoint), **TINY_SETTINGS}  # as run_script passes them
    settings = parse_settings([f"--{k}={v}" for k, v in command_line.items()] + list(args), generate.USED_SETTINGS)
    (folder / "samples").mkdir(parents=True)
    (folder / "samples" / "round.json").write_text(
        json.dumps({"parameters": generate.round_parameters(settings, None), "seeds": PLANNED_SEEDS}))


def write_rated_round(folder, latents, scores, pngs=False):
    """<i>.png's latent (and, with `pngs`, a small grey PNG) for each latent, and scores.json."""
    os.makedirs(folder, exist_ok=True)
    for i, latent in enumerate(latents):
        save_latent(latent_file(folder, f"{i}.png"), latent)
        if pngs:
            Image.new("RGB", (64, 64), (100, 100, 100)).save(os.path.join(folder, f"{i}.png"))
    write_json_atomic(os.path.join(folder, "scores.json"), {f"{i}.png": int(s) for i, s in enumerate(scores)})


def brightness_like_round(n, seed=0):
    """Latents whose channel 0 carries a per-image offset (as brightness does), scored by that offset."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randn(n, generator=generator)
    latents = torch.randn(n, 4, 8, 8, generator=generator)
    latents[:, 0] += offsets[:, None, None]
    return latents, torch.clamp(torch.round(2 * offsets), -5, 5), offsets


def write_red_round(samples, seeds, red, scores, score_name="scores.json", round_json=False):
    """A rated round as generate and score leave it: for each seed a 64x64 PNG of red seed x `red` and an 8x8
    latent (seeded), `scores` {seed: score} as `score_name`, and with `round_json` a round.json of the seeds."""
    samples.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for seed in seeds:
        Image.new("RGB", (64, 64), (seed * red, 0, 0)).save(samples / f"{seed}.png")
        save_latent(latent_file(str(samples), f"{seed}.png"), torch.randn(4, 8, 8, generator=generator))
    if round_json:
        (samples / "round.json").write_text(json.dumps({"parameters": {"prompt": "old"}, "seeds": list(seeds)}))
    (samples / score_name).write_text(json.dumps({f"{seed}.png": score for seed, score in scores.items()}))
