"""Making every rating count: the losses against hand-computed values, the reward ensemble and its file,
the order that puts the ensemble's doubts first, train_reward learning from scores and comparisons
together, and the rating-efficiency benchmark's runs on a small synthetic round."""

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from helpers import brightness_like_round, write_rated_round

from conftest import assert_ok, run_script
from ddpo.rating_order import next_pairs
from ddpo.reward_model import LatentRewardModel, RewardEnsemble
from ddpo.reward_training import (
    bradley_terry_loss,
    calibrate_to_scores,
    predict,
    score_ranking_loss,
    selection_of,
    split_indices,
)
from tools.scripted_rater import TASTES, NoisyRater
from utils.files import write_json_atomic
from utils.ratings import order_round, read_rating_order, update_rating_order
from utils.reward_files import load_reward_model, reward_model_metadata, save_reward_model
from utils.samples import latent_file, load_latent, save_latent

# ---------------------------------------------------------------- losses, by hand

def test_the_ranking_loss_is_the_mean_logistic_loss_over_pairs_with_different_scores():
    predicted, scores = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([1.0, 2.0, 2.0])
    # pairs with a higher score: (image 1 over 0) margin 1 - 0 = 1, (image 2 over 0) margin 3; 1 and 2 tie
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-3))) / 2  # 0.180925
    assert score_ranking_loss(predicted, scores).item() == pytest.approx(expected, abs=1e-6)
    assert score_ranking_loss(predicted, torch.tensor([2.0, 2.0, 2.0])).item() == 0.0  # no order to learn
    assert score_ranking_loss(torch.tensor([1.0, 0.0]), torch.tensor([5.0, -5.0])).item() == pytest.approx(
        math.log(1 + math.exp(-1)), abs=1e-6)  # only the order counts, not the size of the gap


def test_bradley_terry_counts_a_tie_as_one_half():
    reward_a, reward_b = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0])
    outcomes = torch.tensor([1.0, 0.5, 0.0])  # a better; about the same; b better
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = (-math.log(sigmoid(1.0))                                  # a won by a margin of 1
                - (0.5 * math.log(sigmoid(0.0)) + 0.5 * math.log(1 - sigmoid(0.0)))  # a tie at equal rewards: log 2
                - math.log(1 - sigmoid(-2.0))) / 3                       # b won, a was 2 behind
    assert expected == pytest.approx(0.377779, abs=1e-6)
    assert bradley_terry_loss(reward_a, reward_b, outcomes).item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- held-out ratings and the score scale

def test_each_member_holds_out_other_ratings_and_the_first_holds_out_the_seeds():
    seeds_split = torch.randperm(50, generator=torch.Generator().manual_seed(0))[:5]  # upstream's 10%, fixed shuffle
    splits = [split_indices(50, 0.1, member) for member in range(4)]
    assert torch.equal(splits[0][1], seeds_split)
    for train, test in splits:
        assert len(test) == 5 and sorted(torch.cat([train, test]).tolist()) == list(range(50))
    held_out = torch.cat([test for _, test in splits])
    assert len(set(held_out.tolist())) == 20  # four different fifths of the ratings: each trains 3 of the 4 CNNs
    wrapped = [set(split_indices(10, 0.3, member)[1].tolist()) for member in range(4)]  # 4 x 3 > 10: they wrap round
    assert all(len(w) == 3 for w in wrapped) and set().union(*wrapped) == set(range(10))
    assert len(split_indices(10, 0.0, 3)[1]) == 0 and len(split_indices(1, 0.5, 2)[1]) == 0


def test_the_best_epoch_is_the_lowest_test_loss_but_with_the_ranking_loss_the_best_test_spearman():
    early = {"epoch": 2, "train_loss": 0.65, "test_loss": 0.69, "test_spearman": 0.21}
    late = {"epoch": 10, "train_loss": 0.30, "test_loss": 0.80, "test_spearman": 0.47}  # wider margins, better order
    for loss, chosen in (("mse", early), ("ranking", late)):
        assert min((early, late), key=lambda r: selection_of(r, loss)[0]) is chosen
    assert selection_of({"epoch": 1, "train_loss": 0.3}, "ranking") == (0.3, "lowest train loss")  # nothing held out
    compared = {"epoch": 3, "train_loss": 0.5, "test_loss": 0.6, "test_comparison_accuracy": 0.75}  # no held-out scores
    assert selection_of(compared, "ranking") == (-0.75, "best test comparison accuracy")
    assert selection_of(compared, "mse") == (0.6, "best test loss")


def test_calibration_puts_ranking_rewards_on_the_score_scale_and_keeps_their_order():
    from ddpo.reward_training import Ratings
    from ddpo.statistics import spearman
    latents, scores, _ = brightness_like_round(60)
    torch.manual_seed(0)
    model = LatentRewardModel()
    ratings = Ratings.of_scores(latents, scores)
    sign = 1.0 if spearman(predict(model, latents, 16), scores) > 0 else -1.0  # a model that ranks them roughly right
    with torch.no_grad():
        model.head[-1].weight.mul_(40.0 * sign)  # on a ranking loss's arbitrary scale
        model.head[-1].bias.mul_(40.0 * sign)
    before = predict(model, latents, 16)
    calibrate_to_scores(model, ratings, 16)
    after = predict(model, latents, 16)
    assert spearman(after, before) == pytest.approx(1.0)  # the same order
    residual = scores - after  # least squares: no mean error, nothing left that the reward predicts
    assert residual.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert torch.dot(residual, after - after.mean()).item() == pytest.approx(0.0, abs=1e-2)
    assert after.std() <= scores.std() + 1e-4
    reverse = predict(model, latents, 16)
    calibrate_to_scores(model, Ratings.of_scores(latents, -after.detach()), 16)  # scores that reverse the order
    assert torch.equal(predict(model, latents, 16), reverse)  # a slope below 0 is never used: left as it is


# ---------------------------------------------------------------- the ensemble, its file, its order

def calibrated_ensemble(size=4):
    """Members from different random starts, shifted so that all of them score a zero latent exactly 0:
    they agree there and disagree elsewhere."""
    members = []
    for seed in range(size):
        torch.manual_seed(seed)
        member = LatentRewardModel()
        with torch.no_grad():
            member.head[-1].bias -= member(torch.zeros(1, 4, 8, 8))[0]
        members.append(member)
    return RewardEnsemble(members).eval()


def test_a_saved_ensemble_loads_as_the_mean_of_its_members(tmp_path):
    ensemble, latents = calibrated_ensemble(), torch.randn(5, 4, 8, 8)
    path = str(tmp_path / "reward_model.safetensors")
    save_reward_model(ensemble, path, {"ensemble_size": 4})
    loaded = load_reward_model(path)
    assert isinstance(loaded, RewardEnsemble) and len(loaded.members) == 4
    scores = loaded(latents)
    assert scores.shape == (5,)
    assert torch.allclose(scores, torch.stack([m(latents) for m in ensemble.members]).mean(0), atol=1e-6)
    single = str(tmp_path / "single.safetensors")
    save_reward_model(ensemble.members[0], single, {})
    assert isinstance(load_reward_model(single), LatentRewardModel)  # upstream's file, keys as before


def test_the_order_puts_the_images_the_members_disagree_on_first(tmp_path):
    ensemble, folder = calibrated_ensemble(), tmp_path / "samples"
    generator = torch.Generator().manual_seed(0)
    latents = {0: torch.zeros(4, 8, 8), 1: 3 * torch.randn(4, 8, 8, generator=generator), 2: torch.zeros(4, 8, 8),
               3: 0.3 * torch.randn(4, 8, 8, generator=generator), 4: 3 * torch.randn(4, 8, 8, generator=generator)}
    for seed, latent in latents.items():
        save_latent(latent_file(folder, f"{seed}.png"), latent)
        (folder / f"{seed}.png").write_bytes(b"")
    save_reward_model(ensemble, str(tmp_path / "reward_model.safetensors"), {"family": "sd15"})
    order_round(str(folder), ensemble, str(tmp_path / "reward_model.safetensors"))
    entries = read_rating_order(str(folder))
    stds = {e["file"]: e["std"] for e in entries}
    assert stds["0.png"] == pytest.approx(0, abs=1e-6) and stds["2.png"] == pytest.approx(0, abs=1e-6)
    assert min(stds["1.png"], stds["4.png"]) > stds["3.png"] > 1e-4
    assert [e["file"] for e in entries][:3] == sorted(["1.png", "4.png", "3.png"], key=lambda f: -stds[f])
    assert [e["file"] for e in entries][3:] == ["0.png", "2.png"]  # the agreed ones last, in seed order
    members = ensemble.member_scores(load_latent(latent_file(folder, "1.png"))[None])[:, 0]  # as saved: fp16
    first = next(e for e in entries if e["file"] == "1.png")
    assert first["members"] == pytest.approx(members.tolist(), abs=1e-5)
    assert first["std"] == pytest.approx(members.std().item(), abs=1e-5)


def test_the_next_pair_is_the_one_the_members_split_on_else_the_least_rated():
    predictions = [{"file": "a.png", "mean": 0.0, "std": 0.1, "members": [0.0, 0.1, 0.2, 0.3]},
                   {"file": "b.png", "mean": 0.1, "std": 0.1, "members": [0.3, 0.2, 0.1, 0.0]},  # split 2:2 with a
                   {"file": "c.png", "mean": 0.2, "std": 0.1, "members": [0.5, 0.5, 0.5, 0.5]}]  # all put c first
    names = ["a.png", "b.png", "c.png"]
    assert [set(p) for p in next_pairs(names, predictions, [], set(), random.Random(0))] == [{"a.png", "b.png"}]
    asked = [{"a": "b.png", "b": "a.png", "winner": "tie"}]
    assert next_pairs(names, predictions, asked, set(), random.Random(0), count=5) != []
    assert all({"a.png", "b.png"} != set(p) for p in next_pairs(names, predictions, asked, set(), random.Random(0), 5))
    # without a model: the images rated or compared least go first (a: scored and compared, b: compared)
    for seed in range(5):
        pairs = next_pairs(names + ["d.png"], None, [{"a": "a.png", "b": "b.png", "winner": "a"}], {"a.png"},
                           random.Random(seed), count=2)
        assert set(pairs[0]) == {"c.png", "d.png"} and "a.png" not in pairs[1]


# ---------------------------------------------------------------- train_reward on scores and comparisons

def comparisons_by(offsets, pairs):
    return [{"a": f"{a}.png", "b": f"{b}.png", "winner": "a" if offsets[a] > offsets[b] else "b"} for a, b in pairs]


@pytest.mark.stages
def test_train_reward_learns_from_scores_and_comparisons_of_every_round_with_an_ensemble(tmp_path):
    latents, scores, offsets = brightness_like_round(240)
    samples, old = tmp_path / "samples", tmp_path / "samples" / "history" / "round_001"
    write_rated_round(samples, latents[:80], scores[:80], pngs=True)  # scores of 80 images here...
    rng = np.random.default_rng(0)
    for i, latent in enumerate(latents[80:]):  # ... and only comparisons of 160 others in an earlier round
        save_latent(latent_file(old, f"{i}.png"), latent)
    old_pairs = [tuple(int(x) for x in rng.choice(160, 2, replace=False)) for _ in range(300)]
    write_json_atomic(old / "comparisons.json", comparisons_by(offsets[80:], old_pairs))
    write_json_atomic(samples / "comparisons.json", comparisons_by(offsets, [(0, 1), (2, 3)]) + [
        {"a": "4.png", "b": "5.png", "winner": "tie"}])
    result = assert_ok(run_script("train_reward", "--train_reward_num_epochs=15", "--train_reward_batch_size=32",
                                  "--train_reward_test_split_ratio=0.2", "--train_reward_loss=ranking",
                                  "--train_reward_ensemble_size=3", cwd=tmp_path))
    assert "80 ratings (mean" in result.stdout, result.stdout
    assert "and 303 comparisons: 306 to train on, 77 held out" in result.stdout, result.stdout
    assert "each of the 3 CNNs holds out different ones" in result.stdout
    path = str(tmp_path / "models" / "reward_model.safetensors")
    metadata = reward_model_metadata(path)
    assert metadata["ensemble_size"] == 3 and metadata["num_comparisons"] == 303 and metadata["loss"] == "ranking"
    assert metadata["test_comparison_accuracy"] > 0.8 and metadata["test_spearman"] > 0.7, metadata

    model = load_reward_model(path)  # the ensemble's mean ranks fresh images by the rule
    rewards = model(latents[:80])  # on the scale of the scores, though the ranking loss only orders images
    assert rewards.mean().item() == pytest.approx(scores[:80].mean().item(), abs=1e-3)
    assert rewards.std() <= scores[:80].std()
    fresh, _, fresh_offsets = brightness_like_round(100, seed=1)
    from ddpo.statistics import spearman
    assert spearman(model(fresh), fresh_offsets) > 0.8

    entries = read_rating_order(str(samples))  # the current round, ordered by the members' disagreement
    assert sorted(e["file"] for e in entries) == sorted(f"{i}.png" for i in range(80))
    assert [e["std"] for e in entries] == sorted((e["std"] for e in entries), reverse=True) and entries[0]["std"] > 0
    assert "wrote" in result.stdout and "rating_order.json" in result.stdout
    assert update_rating_order(str(samples), path) is None  # fresh: score.py leaves it as it is
    os.utime(path)  # a newer reward model: score.py orders the round again
    os.utime(samples / "rating_order.json", (1, 1))
    assert "rating_order.json" in update_rating_order(str(samples), path)


@pytest.mark.stages
def test_a_malformed_comparisons_json_names_the_entry(tmp_path):
    latents, scores, _ = brightness_like_round(20)
    write_rated_round(tmp_path / "samples", latents, scores)
    (tmp_path / "samples" / "comparisons.json").write_text(json.dumps([{"a": "1.png", "b": "2.png", "winner": "c"}]))
    result = run_script("train_reward", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "comparisons.json" in result.stderr and "entry 1" in result.stderr and "tie" in result.stderr


# ---------------------------------------------------------------- the scripted raters and the benchmark

def test_noisy_raters_jitter_by_a_point_and_sometimes_say_anything():
    rater = NoisyRater({"mean": 0.0, "std": 2.0}, np.random.default_rng(0), inconsistency=0.05)
    values = {i: 1.0 for i in range(4000)}  # every image is worth exactly +1
    counts = np.bincount(np.array(list(rater.scores(values).values())) + 5, minlength=11)
    assert counts[5 + 1] / 4000 == pytest.approx(0.5 * 0.95 + 0.05 / 11, abs=0.03)
    assert (counts[5] + counts[5 + 2]) / 4000 == pytest.approx(0.5 * 0.95 + 2 * 0.05 / 11, abs=0.03)
    assert counts[0] > 0 and counts[10] > 0  # the occasional rating that is not what they think
    answers = [rater.compare(3.0, -3.0) for _ in range(1000)]
    assert 0.9 < answers.count("a") / 1000 < 1 and answers.count("b") > 0
    rgb = np.zeros((8, 8, 3))
    rgb[:4] = 200.0  # a bright top, dark bottom
    assert TASTES["top_heavy"](rgb) == pytest.approx(200 * 0.299 + 200 * 0.587 + 200 * 0.114)
    centre = np.zeros((8, 8, 3))
    centre[2:6, 2:6] = 100.0  # a bright middle quarter, a dark border
    assert TASTES["bright_centre"](centre) == pytest.approx(100.0)
    assert TASTES["sharpness"](np.zeros((8, 8, 3))) == 0 < TASTES["sharpness"](centre)
    for taste in TASTES.values():  # a mirrored image is liked the same (train_reward's flip augmentation)
        image = np.random.default_rng(1).uniform(0, 255, (8, 8, 3))
        assert taste(image) == pytest.approx(taste(image[:, ::-1]))


@pytest.mark.parametrize("method", ["baseline", "active", "active_pairs"])
def test_the_benchmark_runs_a_method_and_measures_it(method):
    from tools import benchmark_ratings

    latents, _, offsets = brightness_like_round(260)
    values = offsets.numpy()
    results = benchmark_ratings.run(method, latents[:200], values[:200], latents[200:], values[200:], [40, 80], 0)
    assert sorted(results) == [40, 80]
    assert all(-1 <= r["spearman"] <= 1 and 0 <= r["pairwise_accuracy"] <= 1 for r in results.values())
    assert results[80]["spearman"] > 0.3, results
