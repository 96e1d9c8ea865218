"""How the reward CNN learns from ratings: the losses, the train/test split and the training loop.

train_reward.py calls `fit_reward_model` on the ratings it read; tools/benchmark_ratings.py calls the same
function on a scripted rater's ratings, so what the benchmark measures is what train_reward does.

A person's ratings are of two kinds, and one model learns from both together:
  scores       an image's score -5..5 (samples/scores.json): MSE on the score (upstream's loss), or a
               ranking loss that only asks the model to order each batch's images of one prompt as their
               scores do (the CNN never sees the prompt: pairs across prompts would teach it which subject
               the person prefers, not how they like it drawn);
  comparisons  "a is better than b" or "about the same" (samples/comparisons.json): Bradley–Terry,
               P(a better than b) = sigmoid(r_a - r_b), with "about the same" as probability 0.5.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddpo.reward_model import LatentRewardModel, RewardEnsemble
from ddpo.statistics import pairwise_accuracy, pearson, spearman

OUTCOMES = {"a": 1.0, "b": 0.0, "tie": 0.5}  # a comparison's winner -> P(a is better than b)


@dataclass
class Ratings:
    """Everything a person said about a set of images; scores and comparisons index into `latents`."""
    latents: torch.Tensor  # (n, 4, h/8, w/8) every scored or compared image
    scored: torch.Tensor  # (s,) long: which latents have a score
    scores: torch.Tensor  # (s,) float, -5..5
    pairs: torch.Tensor  # (c, 2) long: the latents (a, b) of each comparison
    outcomes: torch.Tensor  # (c,) float: 1 = a better, 0 = b better, 0.5 = about the same
    groups: torch.Tensor = None  # (s,) long: each score's prompt group (the ranking loss pairs within one); None = one

    def __post_init__(self):
        if self.groups is None:
            self.groups = torch.zeros_like(self.scored)

    @staticmethod
    def of_scores(latents, scores):
        """Scores only, one per latent: (n, 4, h/8, w/8), (n,)."""
        return Ratings(latents, torch.arange(len(scores)), scores.float(), torch.zeros(0, 2, dtype=torch.long),
                       torch.zeros(0))

    def subset(self, score_rows, pair_rows):
        return Ratings(self.latents, self.scored[score_rows], self.scores[score_rows], self.pairs[pair_rows],
                       self.outcomes[pair_rows], self.groups[score_rows])

    def to(self, device):
        return Ratings(*(t.to(device) for t in (self.latents, self.scored, self.scores, self.pairs, self.outcomes,
                                                self.groups)))

    def __len__(self):
        """How many ratings: a comparison counts as one, as a score does."""
        return len(self.scores) + len(self.pairs)


# ---------------------------------------------------------------- losses

def score_ranking_loss(predicted, scores, groups=None):
    """Pairwise logistic loss: mean over pairs with scores_i > scores_j of -log sigmoid(pred_i - pred_j).

    predicted, scores: (b,); groups: (b,) ints, only pairs within a group count (None = one group). Pairs
    with equal scores say nothing about the order and are left out; a batch without any such pair gives 0
    (with a gradient, so it can be summed with other losses).
    """
    better = scores[:, None] > scores[None, :]  # (b, b): row i beats column j
    if groups is not None:
        better &= groups[:, None] == groups[None, :]
    if not better.any():
        return predicted.sum() * 0.0
    margins = predicted[:, None] - predicted[None, :]  # (b, b)
    return F.softplus(-margins[better]).mean()


def bradley_terry_loss(reward_a, reward_b, outcomes):
    """Bradley–Terry: cross-entropy of sigmoid(r_a - r_b) against P(a better) = 1, 0 or 0.5 (a tie). All (c,)."""
    return F.binary_cross_entropy_with_logits(reward_a - reward_b, outcomes)


def score_loss(name, predicted, scores, groups=None):
    """MSE (upstream's; across prompt groups too: a score is a score) or the ranking loss within `groups`."""
    return F.mse_loss(predicted, scores) if name == "mse" else score_ranking_loss(predicted, scores, groups)


# ---------------------------------------------------------------- split and evaluation

def split_indices(n, ratio, member=0, seed=0):
    """Indices (train, test) of one ensemble member: a fixed shuffle (every run holds out the same ratings),
    of which member j holds out the j-th block of ceil(n * ratio), wrapping round. Member 0 holds out the
    first block, upstream's split; the others hold out other ratings, so the ensemble learns from all."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = min(math.ceil(n * ratio), n) if ratio > 0 and n > 1 else 0
    held_out = torch.zeros(n, dtype=torch.bool)
    held_out[(member * n_test + torch.arange(n_test)) % max(n, 1)] = True  # positions in `order`
    return order[~held_out], order[held_out]


def split_ratings(ratings, ratio, member=0):
    """(train, test) Ratings of one ensemble member: `ratio` of the scores, and of the comparisons, held out."""
    score_train, score_test = split_indices(len(ratings.scores), ratio, member, seed=0)
    pair_train, pair_test = split_indices(len(ratings.pairs), ratio, member, seed=1)
    return ratings.subset(score_train, pair_train), ratings.subset(score_test, pair_test)


@torch.no_grad()
def predict(model, latents, batch_size):
    """(n, 4, h/8, w/8) -> (n,) scores, in batches, in eval mode."""
    was_training = model.training
    model.eval()
    predicted = torch.cat([model(latents[i:i + batch_size]) for i in range(0, len(latents), batch_size)])
    model.train(was_training)
    return predicted


def comparison_accuracy(predicted, pairs, outcomes):
    """Share of comparisons with a winner that `predicted` (n,) orders the same way; None without any."""
    decided = outcomes != 0.5
    if not decided.any():
        return None
    a_better = predicted[pairs[decided, 0]] > predicted[pairs[decided, 1]]
    return (a_better == (outcomes[decided] == 1.0)).double().mean().item()


@torch.no_grad()
def evaluate(model, ratings, loss_name, batch_size):
    """Test loss (the training objective) and agreement with the held-out ratings; {} if none are held out."""
    if len(ratings) == 0:
        return {}
    used = torch.unique(torch.cat([ratings.scored, ratings.pairs.reshape(-1)]))  # the held-out images only
    predicted = torch.zeros(len(ratings.latents), device=ratings.latents.device)
    predicted[used] = predict(model, ratings.latents[used], batch_size)  # (n,), 0 where not held out
    record = {"test_loss": objective(loss_name, predicted[ratings.scored], ratings.scores,
                                     predicted[ratings.pairs], ratings.outcomes, ratings.groups).item()}
    if len(ratings.scores):
        on_scored = predicted[ratings.scored]
        record |= {"test_pearson": pearson(on_scored, ratings.scores),
                   "test_spearman": spearman(on_scored, ratings.scores),
                   "test_pairwise_accuracy": pairwise_accuracy(on_scored, ratings.scores)}
    if len(ratings.pairs):
        record["test_comparison_accuracy"] = comparison_accuracy(predicted, ratings.pairs, ratings.outcomes)
    return record


def evaluate_members(members, tests, loss_name, batch_size):
    """Each member's `evaluate` on its own held-out ratings, averaged over the members: how well a CNN does on
    ratings it did not learn from (their mean, the ensemble, does a little better still)."""
    records = [evaluate(member, test, loss_name, batch_size) for member, test in zip(members, tests)]
    means = {}
    for name in dict.fromkeys(name for record in records for name in record):  # in evaluate's order
        values = [r[name] for r in records if r.get(name) is not None]
        means[name] = sum(values) / len(values) if values else None
    return means


def objective(loss_name, predicted, scores, rewards, outcomes, groups=None):
    """The training loss: the score loss on the scored images (predicted, scores, groups: (s,)) plus Bradley–Terry
    on the comparisons (rewards: (c, 2) of a and b, outcomes: (c,)). A part with nothing in it is left out."""
    parts = []
    if len(scores):
        parts.append(score_loss(loss_name, predicted, scores, groups))
    if len(outcomes):
        parts.append(bradley_terry_loss(rewards[:, 0], rewards[:, 1], outcomes))
    return sum(parts)


# ---------------------------------------------------------------- training

def flipped(x, enabled):
    """Each latent (b, 4, h/8, w/8) mirrored left-right with probability 1/2: a mirrored image is rated the same."""
    if not enabled:
        return x
    flip = torch.rand(len(x), device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def train_one_epoch(model, optimizer, train, settings):
    """One pass over the training ratings; returns the mean loss per rating."""
    device, batch_size = train.latents.device, settings.train_reward_batch_size
    score_order = torch.randperm(len(train.scores), device=device)
    pair_order = torch.randperm(len(train.pairs), device=device) if len(train.pairs) else None
    steps = max(math.ceil(len(train.scores) / batch_size), math.ceil(len(train.pairs) / batch_size))
    augment = settings.train_reward_flip_augment
    total = 0.0
    for step in range(steps):
        rows = score_order[step * batch_size:(step + 1) * batch_size]
        pair_rows = pair_order[step * batch_size:(step + 1) * batch_size] if pair_order is not None else rows[:0]
        predicted = model(flipped(train.latents[train.scored[rows]], augment)) if len(rows) else None  # (b,)
        pairs = train.pairs[pair_rows]  # (c, 2)
        rewards = model(flipped(train.latents[pairs.reshape(-1)], augment)).reshape(-1, 2) if len(pairs) else None
        loss = objective(settings.train_reward_loss, predicted, train.scores[rows], rewards, train.outcomes[pair_rows],
                         train.groups[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * (len(rows) + len(pairs))
    return total / max(len(train), 1)


def selection_of(record, loss_name):
    """(what the best epoch minimises, what that is in words): the test loss (the train loss when nothing is
    held out), but with the ranking loss the held-out order: minus the test Spearman, or without held-out
    scores minus the share of held-out comparisons it gets right. Margins keep growing, so the test loss
    rises while the order learned still improves: choosing by it kept epoch 2 of 10 on the benchmark's
    contrast taste (Spearman 0.40 where epoch 10 had 0.47 on the same held-out ratings)."""
    if loss_name == "ranking":
        for name in ("test_spearman", "test_comparison_accuracy"):
            if record.get(name) is not None:
                return -record[name], f"best {name.replace('_', ' ')}"
    if "test_loss" in record:
        return record["test_loss"], "best test loss"
    return record["train_loss"], "lowest train loss"


@torch.no_grad()
def calibrate_to_scores(model, ratings, batch_size):
    """Put a CNN trained by the ranking loss on the person's -5..5 scale, in place: the least-squares fit
    a * reward + b of the scores (a > 0, so the order it learned is kept), folded into its last layer.

    The ranking loss only orders images, so its rewards drift to any scale (std 10-16 on the benchmark); a
    reward read in --rank_folder or the rating page should mean what a score means. train_policy is not
    affected: it standardises rewards into advantages.
    """
    if len(ratings.scores) < 2:
        return
    predicted, scores = predict(model, ratings.latents[ratings.scored], batch_size).double(), ratings.scores.double()
    centred = predicted - predicted.mean()
    slope = (centred * (scores - scores.mean())).sum() / (centred * centred).sum()
    if not torch.isfinite(slope) or slope <= 0:  # a model that learned nothing (or the reverse): left as it is
        return
    last = model.head[-1]
    last.weight.mul_(slope.float())
    last.bias.mul_(slope.float()).add_((scores.mean() - slope * predicted.mean()).float())


def fit_reward_model(settings, ratings, on_epoch=None):
    """Train the reward model on `ratings` and return (model at its best epoch, that epoch's record).

    Uses the settings train_reward_num_epochs, _batch_size, _learning_rate, _loss, _flip_augment,
    _test_split_ratio and _ensemble_size: that many CNNs from different random starts, each with its own
    AdamW, shuffles and held-out ratings (`split_ratings`), saved together (the RewardEnsemble) when more
    than one. The best epoch is the one with the lowest test loss, averaged over the CNNs (the train loss
    when nothing is held out; with the ranking loss the best held-out order: `selection_of`). With the
    ranking loss, each CNN is then calibrated to the scores (`calibrate_to_scores`).
    `on_epoch(record)` is called after every epoch (train_reward logs and prints there).
    """
    device = ratings.latents.device
    count = settings.train_reward_ensemble_size
    splits = [split_ratings(ratings, settings.train_reward_test_split_ratio, member) for member in range(count)]
    members = [LatentRewardModel().to(device) for _ in range(count)]
    model = members[0] if count == 1 else RewardEnsemble(members)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=settings.train_reward_learning_rate) for m in members]
    best, best_state = None, None
    for epoch in range(1, settings.train_reward_num_epochs + 1):
        train_loss = sum(train_one_epoch(m, o, train, settings)
                         for m, o, (train, _) in zip(members, optimizers, splits))
        record = {"epoch": epoch, "train_loss": train_loss / count,
                  **evaluate_members(members, [test for _, test in splits], settings.train_reward_loss,
                                     settings.train_reward_batch_size)}
        if on_epoch:
            on_epoch(record)
        selection_loss, chosen_by = selection_of(record, settings.train_reward_loss)
        if best is None or selection_loss <= best["selection_loss"]:
            best = {"selection_loss": selection_loss, "chosen_by": chosen_by, **record}
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    if settings.train_reward_loss == "ranking":
        for member in members:
            calibrate_to_scores(member, ratings, settings.train_reward_batch_size)
    return model, best
