"""A rater that is a rule, not a person: writes a round's scores.json so the loop can run unattended.

The demo and the tests use it to check that train_reward learns a taste that was really applied, and
that the policy then makes more of what the rule likes. Scores are the rule's values standardised,
doubled, rounded and clipped to -5..5, in exactly the format the rating page writes
({"<seed>.png": int}). Standardised over the round itself by default; with a `calibration` (the
mean and std of an earlier round's values) a value always gets the same score, so rounds compare.
"""

import os

import numpy as np
from PIL import Image

from utils.files import MAX_SCORE, MIN_SCORE, write_json_atomic
from utils.samples import latent_file, load_latent, round_images


def calibration_of(values):
    """{"mean", "std"} of the values {name: value}: the fixed mapping for scores_from_values."""
    x = np.array(list(values.values()), dtype=np.float64)
    return {"mean": float(x.mean()), "std": float(x.std() or 1.0)}


def scores_from_values(values, calibration=None):
    """{name: value} -> {name: int score in -5..5}, standardised, doubled, rounded and clipped.

    Standardised by `calibration` if given, else over these values.
    """
    calibration = calibration or calibration_of(values)
    return {name: int(np.clip(np.rint(2 * (value - calibration["mean"]) / calibration["std"]), MIN_SCORE, MAX_SCORE))
            for name, value in values.items()}


def brightness_values(sample_folder):
    """{name: mean grey level 0..255} of the round's images."""
    values = {}
    for name in round_images(sample_folder):
        with Image.open(os.path.join(sample_folder, name)) as image:
            values[name] = float(np.asarray(image.convert("L"), dtype=np.float64).mean())
    return values


def rate_by_latent_channel(sample_folder, channel=0, score_path=None):
    """Images whose saved final latent has a higher mean in `channel` score higher. Returns the scores.

    A rule the latent determines exactly, so a latent-space reward model can always learn it.
    """
    values = {name: load_latent(latent_file(sample_folder, name))[channel].mean().item()
              for name in round_images(sample_folder)}
    scores = scores_from_values(values)
    write_json_atomic(score_path or os.path.join(sample_folder, "scores.json"), scores)
    return scores
