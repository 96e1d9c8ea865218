"""What to rate next: the images, and the pairs, that the reward ensemble's members disagree about most.

image_predictions sorts a round by disagreement; next_pairs picks comparisons. The file that holds
the order, samples/rating_order.json, is utils/ratings.py's.
"""


import heapq

PAIR_WINDOW = 8  # a pair is drawn from images this close in predicted reward: far apart, the model already knows


def image_predictions(names, member_scores):
    """[{"file", "mean", "std", "members"}] most informative first; member_scores: (members, n) tensor."""
    entries = [{"file": name, "mean": column.mean().item(),
                "std": column.std().item() if len(column) > 1 else 0.0, "members": column.tolist()}
               for name, column in zip(names, member_scores.T)]
    return sorted(entries, key=lambda entry: -entry["std"])  # stable: equal stds stay in seed order


def members_disagreement(members_a, members_b):
    """p (1 - p), p = the share of ensemble members that rank a above b: 0.25 when they split evenly."""
    if not members_a:
        return 0.0
    p = sum(a > b for a, b in zip(members_a, members_b)) / len(members_a)
    return p * (1 - p)


def next_pairs(names, predictions, comparisons, rated, rng, count=1, groups=None):
    """`count` pairs (a, b) of `names` to compare next, most informative first.

    predictions: rating_order.json's entries (or None); comparisons: [{"a", "b", ...}] already made;
    rated: names that have a score; groups: {name: its group (the prompt it was made from)}, or None for
    one group. A pair never crosses groups: the reward model does not see the prompt, so a pair across
    prompts would teach it which subject the person prefers. Candidates are pairs not asked yet among
    images of one group close in predicted reward (random order without predictions). The best pair is
    the one the ensemble's members disagree most about; then the one whose images were rated or
    compared least; then chance.
    """
    by_name = {entry["file"]: entry for entry in predictions or []}
    shuffled = list(names)
    rng.shuffle(shuffled)
    by_reward = sorted((n for n in shuffled if n in by_name), key=lambda n: by_name[n]["mean"])
    lines = {}  # group: its names by predicted reward, then those without a prediction
    for name in by_reward + [n for n in shuffled if n not in by_name]:
        lines.setdefault((groups or {}).get(name), []).append(name)
    asked = {frozenset((c["a"], c["b"])) for c in comparisons}
    seen = {name: int(name in rated) for name in names}
    for c in comparisons:
        for name in (c["a"], c["b"]):
            if name in seen:
                seen[name] += 1
    members = {name: by_name.get(name, {}).get("members", []) for name in names}
    # a max-heap of (-disagreement, images' ratings so far, chance, a, b); ratings so far only grow, so an
    # entry whose count is stale is pushed back with the new count (lazy greedy), and the top is the best
    heap = [(-members_disagreement(members[a], members[b]), seen[a] + seen[b], rng.random(), a, b)
            for line in lines.values() for i, a in enumerate(line) for b in line[i + 1:i + 1 + PAIR_WINDOW]
            if frozenset((a, b)) not in asked]
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

