"""A rater that is a rule, not a person: writes a round's scores.json so the loop can run unattended.

The demo and the tests use it to check that train_reward learns a taste that was really applied, and
that the policy then makes more of what the rule likes. Scores are the rule's values standardised,
doubled, rounded and clipped to -5..5, in exactly the format the rating page writes
({"<seed>.png": int}). Standardised over the round itself by default; with a `calibration` (the
mean and std of an earlier round's values) a value always gets the same score, so rounds compare.

tools/benchmark_ratings.py needs raters with other tastes (TASTES: a value per image, higher = liked
more) who rate as people do (NoisyRater): a point of jitter, now and then a rating that is not
what they think at all, and comparisons ("a", "b" or "tie") from the same noisy judgement.
"""

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from utils.files import write_json_atomic
from utils.ratings import MAX_SCORE, MIN_SCORE
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


def _grey(rgb):
    return rgb @ np.array([0.299, 0.587, 0.114])  # (h, w): ITU-R 601 luma, as PIL's convert("L")


def _saturation(rgb):
    high, low = rgb.max(-1), rgb.min(-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1e-9), 0.0)  # (h, w) in 0..1, HSV's S


def _centre_minus_border(grey):
    h, w = grey.shape
    centre = np.zeros((h, w), dtype=bool)
    centre[h // 4: h - h // 4, w // 4: w - w // 4] = True  # the middle half in each direction: a quarter of the image
    return grey[centre].mean() - grey[~centre].mean()


# taste name -> value of an (h, w, 3) float RGB array in 0..255; every one is unchanged by a left-right
# mirror, because train_reward's flip augmentation (on by default) teaches that a mirrored image rates the same
TASTES = {
    "brightness": lambda rgb: _grey(rgb).mean(),
    "redness": lambda rgb: (rgb[..., 0] - rgb[..., 1:].mean(-1)).mean(),
    "contrast": lambda rgb: _grey(rgb).std(),
    "saturation": lambda rgb: _saturation(rgb).mean(),
    "top_heavy": lambda rgb: (lambda g: g[: len(g) // 2].mean() - g[len(g) // 2:].mean())(_grey(rgb)),
    # opposite pairs for tools/benchmark_policy.py: a LoRA that pleases one of a pair must displease the other
    "darkness": lambda rgb: -_grey(rgb).mean(),
    "warmth": lambda rgb: (rgb[..., 0] - rgb[..., 2]).mean(),
    "coolness": lambda rgb: (rgb[..., 2] - rgb[..., 0]).mean(),
    # not looked at while choosing the few_ratings recipe: they check it on tastes it was not tuned on
    "greenness": lambda rgb: (rgb[..., 1] - rgb[..., [0, 2]].mean(-1)).mean(),
    "blueness": lambda rgb: (rgb[..., 2] - rgb[..., :2].mean(-1)).mean(),
    "bright_centre": lambda rgb: _centre_minus_border(_grey(rgb)),
    "sharpness": lambda rgb: (lambda g: np.abs(np.diff(g, axis=0)).mean()
                              + np.abs(np.diff(g, axis=1)).mean())(_grey(rgb)),
}
TUNED_ON = ("brightness", "redness", "contrast", "saturation", "top_heavy")  # the few_ratings recipe was tuned on these


def taste_values(sample_folder, tastes=("brightness",), names=None):
    """{taste: {name: value}} of the round's images (or `names`), each image read once."""
    values = {taste: {} for taste in tastes}
    for name in names if names is not None else round_images(sample_folder):
        with Image.open(os.path.join(sample_folder, name)) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
        for taste in tastes:
            values[taste][name] = float(TASTES[taste](rgb))
    return values


def brightness_values(sample_folder):
    """{name: mean grey level 0..255} of the round's images."""
    values = {}
    for name in round_images(sample_folder):
        with Image.open(os.path.join(sample_folder, name)) as image:
            values[name] = float(np.asarray(image.convert("L"), dtype=np.float64).mean())
    return values


@dataclass
class NoisyRater:
    """Rates as a person does: the rule's score (scores_from_values with `calibration`) plus a point of jitter
    (-1, 0 or +1 with probabilities 1/4, 1/2, 1/4), and with probability `inconsistency` any score at all.

    A comparison is the same noisy judgement of both images: "tie" when the noisy scores are equal,
    and with probability `inconsistency` any of the three answers.
    """
    calibration: dict
    rng: np.random.Generator
    inconsistency: float = 0.05

    def _judged(self, value):
        score = 2 * (value - self.calibration["mean"]) / self.calibration["std"] + self.rng.choice([-1, 0, 0, 1])
        return int(np.clip(np.rint(score), MIN_SCORE, MAX_SCORE))

    def scores(self, values):
        """{name: value} -> {name: int -5..5}"""
        return {name: int(self.rng.integers(MIN_SCORE, MAX_SCORE + 1)) if self.rng.random() < self.inconsistency
                else self._judged(value) for name, value in values.items()}

    def compare(self, value_a, value_b):
        """"a" if a looks better, "b" if b does, "tie" if they look about the same."""
        if self.rng.random() < self.inconsistency:
            return str(self.rng.choice(["a", "b", "tie"]))
        score_a, score_b = self._judged(value_a), self._judged(value_b)
        return "a" if score_a > score_b else "b" if score_b > score_a else "tie"


def rate_by_latent_channel(sample_folder, channel=0, score_path=None):
    """Images whose saved final latent has a higher mean in `channel` score higher. Returns the scores.

    A rule the latent determines exactly, so a latent-space reward model can always learn it.
    """
    values = {name: load_latent(latent_file(sample_folder, name))[channel].mean().item()
              for name in round_images(sample_folder)}
    scores = scores_from_values(values)
    write_json_atomic(score_path or os.path.join(sample_folder, "scores.json"), scores)
    return scores
