"""Numbers and plots that show whether a stage is learning: correlations, JSON-lines logs, curves."""

import json
import os

import torch


def pearson(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denominator = (a.norm() * b.norm()).item()
    return (a @ b).item() / denominator if denominator > 0 else 0.0


def _ranks(x):
    """Average ranks (ties share their mean rank), as Spearman's correlation needs."""
    order = torch.argsort(x)
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for value in torch.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a, b):
    return pearson(_ranks(a), _ranks(b))


def pairwise_accuracy(predicted, target):
    """Share of pairs with different target scores that `predicted` orders the same way."""
    diff_target = target[:, None] - target[None, :]
    diff_predicted = predicted[:, None] - predicted[None, :]
    pairs = diff_target > 0
    if not pairs.any():
        return 0.0
    return (diff_predicted[pairs] > 0).double().mean().item()


def append_jsonl(path, record):
    """One line per epoch; appending keeps earlier runs' lines (nothing is overwritten)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(path, records, x_key, panels, title):
    """A PNG with one panel per (panel title, [metric keys]); written to a temp file and renamed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, (panel_title, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(r[x_key], r[key]) for r in records if r.get(key) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", markersize=3, label=key)
        axis.set_title(panel_title)
        axis.set_xlabel(x_key)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path + ".tmp.png", dpi=100)
    plt.close(figure)
    os.replace(path + ".tmp.png", path)
