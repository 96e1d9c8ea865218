"""What to rate next: the images, and the pairs, that the reward model is least sure about.

The reward model can be an ensemble of small CNNs (train_reward_ensemble_size). Where its members
disagree, a rating teaches it most. samples/rating_order.json holds, for the round's images that have
a saved latent, the ensemble's prediction:

    {"reward_model": "models/reward_model.safetensors", "ensemble_size": 4,
     "images": [{"file": "<seed>.png", "mean": 0.8, "std": 0.3, "members": [0.5, 1.1, 0.6, 1.0]}, ...]}

`images` is most informative first: the highest std across members first (equal ones in seed order).
train_reward.py writes it after training; score.py writes it at start when a reward model exists (the
round is usually new then). The rating page orders by it on request, and picks comparison pairs with it.
"""

import heapq
import json
import os

import torch

from utils.files import write_json_atomic
from utils.reward_model import load_reward_model, member_scores
from utils.samples import latent_file, load_latent, round_images

ORDER_FILE = "rating_order.json"
PAIR_WINDOW = 8  # a pair is drawn from images this close in predicted reward: far apart, the model already knows


def order_path(sample_path):
    return os.path.join(sample_path, ORDER_FILE)


def image_predictions(names, member_scores):
    """[{"file", "mean", "std", "members"}] most informative first; member_scores: (members, n) tensor."""
    entries = [{"file": name, "mean": column.mean().item(),
                "std": column.std().item() if len(column) > 1 else 0.0, "members": column.tolist()}
               for name, column in zip(names, member_scores.T)]
    return sorted(entries, key=lambda entry: -entry["std"])  # stable: equal stds stay in seed order


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


def members_disagreement(members_a, members_b):
    """p (1 - p), p = the share of ensemble members that rank a above b: 0.25 when they split evenly."""
    if not members_a:
        return 0.0
    p = sum(a > b for a, b in zip(members_a, members_b)) / len(members_a)
    return p * (1 - p)


def next_pairs(names, predictions, comparisons, rated, rng, count=1):
    """`count` pairs (a, b) of `names` to compare next, most informative first.

    predictions: rating_order.json's entries (or None); comparisons: [{"a", "b", ...}] already made;
    rated: names that have a score. Candidates are pairs not asked yet among images close in predicted
    reward (random order without predictions). The best pair is the one the ensemble's members
    disagree most about; then the one whose images were rated or compared least; then chance.
    """
    by_name = {entry["file"]: entry for entry in predictions or []}
    shuffled = list(names)
    rng.shuffle(shuffled)
    line = sorted((n for n in shuffled if n in by_name), key=lambda n: by_name[n]["mean"])
    line += [n for n in shuffled if n not in by_name]
    asked = {frozenset((c["a"], c["b"])) for c in comparisons}
    seen = {name: int(name in rated) for name in names}
    for c in comparisons:
        for name in (c["a"], c["b"]):
            if name in seen:
                seen[name] += 1
    members = {name: by_name.get(name, {}).get("members", []) for name in line}
    # a max-heap of (-disagreement, images' ratings so far, chance, a, b); ratings so far only grow, so an
    # entry whose count is stale is pushed back with the new count (lazy greedy), and the top is the best
    heap = [(-members_disagreement(members[a], members[b]), seen[a] + seen[b], rng.random(), a, b)
            for i, a in enumerate(line) for b in line[i + 1:i + 1 + PAIR_WINDOW] if frozenset((a, b)) not in asked]
    heapq.heapify(heap)
    chosen = []
    while heap and len(chosen) < count:
        disagreement, so_far, chance, a, b = heapq.heappop(heap)
        if so_far != seen[a] + seen[b]:
            heapq.heappush(heap, (disagreement, seen[a] + seen[b], chance, a, b))
            continue
        chosen.append((a, b))
        seen[a] += 1
        seen[b] += 1
    return chosen


def informativeness_summary(predictions):
    """One line for the terminal: how much the members disagree, and whether ordering by it means anything."""
    stds = [entry["std"] for entry in predictions]
    if not stds or max(stds) == 0:
        return "the reward model is a single CNN (train_reward_ensemble_size=1): no disagreement to order by"
    mean = sum(stds) / len(stds)
    return f"ensemble disagreement (std of predicted score): mean {mean:.3f}, max {max(stds):.3f}, " \
           f"{sum(s > mean for s in stds)} of {len(stds)} images above the mean"

