"""Agreement between two orderings of the same images: Pearson, Spearman, pairwise accuracy."""

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
