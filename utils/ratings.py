"""The person's ratings on disk: the formats of scores.json and comparisons.json, and rating_order.json.

scores.json is the upstream WebApp's {"<seed>.png": -5..+5}; comparisons.json is
[{"a": "<seed>.png", "b": "<seed>.png", "winner": "a"|"b"|"tie"}]. rating_order.json holds, for the
round's images that have a saved latent, the reward ensemble's prediction:

    {"reward_model": "models/reward_model.safetensors", "ensemble_size": 4,
     "images": [{"file": "<seed>.png", "mean": 0.8, "std": 0.3, "members": [0.5, 1.1, 0.6, 1.0]}, ...]}

`images` is most informative first (ddpo/rating_order.py). train_reward.py writes it after training;
score.py writes it at start when a reward model is newer than it. The rating page orders by it on
request, and picks comparison pairs with it.
"""

import json
import os

import torch

from ddpo.rating_order import image_predictions, informativeness_summary
from ddpo.reward_model import member_scores
from utils.files import write_json_atomic
from utils.reward_files import load_reward_model
from utils.samples import latent_file, load_latent, round_images

MIN_SCORE, MAX_SCORE = -5, 5


def scores_format_problem(scores):
    """Why `scores` is not in the seed WebApp's format {"<file>.png": whole number in -5..+5}, or None."""
    if not isinstance(scores, dict):
        return f"not an object {{\"<seed>.png\": score}} but a {type(scores).__name__}"
    for name, score in scores.items():
        if isinstance(score, bool) or not isinstance(score, int) or not MIN_SCORE <= score <= MAX_SCORE:
            return f"not in the expected format (the score of {name!r} is {score!r}, not a whole number from -5 to 5)"
    return None


def round_file_problem(name):
    """Why a scores.json key cannot name a file of its round (a path, not a plain file name), or None."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        return f"{name!r} is not a plain file name of the round's folder"


WINNERS = ("a", "b", "tie")  # a comparison's answer: a is better, b is better, about the same


def comparisons_format_problem(comparisons):
    """Why `comparisons` is not [{"a": "<file>.png", "b": "<file>.png", "winner": "a"|"b"|"tie"}, ...], or None."""
    if not isinstance(comparisons, list):
        return f'not a list [{{"a": "<seed>.png", "b": "<seed>.png", "winner": "a"}}, ...] but a {type(comparisons).__name__}'
    for number, entry in enumerate(comparisons, 1):
        if not (isinstance(entry, dict) and set(entry) == {"a", "b", "winner"} and not round_file_problem(entry["a"])
                and not round_file_problem(entry["b"]) and entry["a"] != entry["b"] and entry["winner"] in WINNERS):
            return (f'not in the expected format (entry {number}, {entry!r}, is not {{"a": "<file>", "b": "<another '
                    f'file>", "winner": "a", "b" or "tie"}})')
    return None


ORDER_FILE = "rating_order.json"


def order_path(sample_path):
    return os.path.join(sample_path, ORDER_FILE)


def write_rating_order(sample_path, names, member_scores, reward_model_path):
    """Write rating_order.json for `names` given the ensemble's (members, n) scores of them; returns its path."""
    path = order_path(sample_path)
    write_json_atomic(path, {"reward_model": reward_model_path, "ensemble_size": int(member_scores.shape[0]),
                             "images": image_predictions(names, member_scores)})
    return path


@torch.no_grad()
def order_round(sample_path, model, reward_model_path, device="cpu", batch_size=256):
    """Score the round's images that have a saved latent with every member; write rating_order.json.

    Returns a line for the terminal (None when the round has no saved latents).
    """
    names = [n for n in round_images(sample_path) if os.path.isfile(latent_file(sample_path, n))]
    if not names:
        return None
    model.eval()
    scores = torch.cat([member_scores(model, torch.stack([load_latent(latent_file(sample_path, n))
                                                          for n in names[i:i + batch_size]]).to(device)).cpu()
                        for i in range(0, len(names), batch_size)], dim=1)  # (members, n)
    path = write_rating_order(sample_path, names, scores, reward_model_path)
    return f"wrote {path}: {informativeness_summary(read_rating_order(sample_path))}"


def update_rating_order(sample_path, reward_model_path):
    """order_round with the saved reward model, unless rating_order.json is newer and covers the round.

    A new round has no order yet, and the model that can order it was trained on the rounds before.
    """
    if not os.path.isfile(reward_model_path):
        return None
    path, predictions = order_path(sample_path), read_rating_order(sample_path)
    with_latents = {n for n in round_images(sample_path) if os.path.isfile(latent_file(sample_path, n))}
    if (predictions is not None and os.path.getmtime(path) >= os.path.getmtime(reward_model_path)
            and {entry["file"] for entry in predictions} == with_latents):
        return None
    return order_round(sample_path, load_reward_model(reward_model_path), reward_model_path)


def read_rating_order(sample_path):
    """The entries of rating_order.json, or None when there is none (or it is not one train_reward wrote)."""
    try:
        with open(order_path(sample_path), encoding="utf-8") as f:
            images = json.load(f)["images"]
        return [{"file": str(e["file"]), "mean": float(e["mean"]), "std": float(e["std"]),
                 "members": [float(m) for m in e["members"]]} for e in images]
    except (OSError, ValueError, KeyError, TypeError):
        return None
