"""train_reward's measurements of itself: on a rule it can learn, on random scores, on too few ratings;
its metrics file and plot; and --rank_folder, which ranks a folder of images with the trained model.

The rounds here are made of latents written as generate.py writes them, with scores.json beside them,
so no diffusion runs and the reward model's numbers are the only thing under test.
"""

import json
import math
import os

import pytest
import torch
from helpers import brightness_like_round, write_rated_round
from PIL import Image

from conftest import assert_ok, run_script, snapshot
from ddpo.statistics import spearman
from utils.metrics import read_jsonl
from utils.reward_files import reward_model_metadata

pytestmark = pytest.mark.stages  # every test here runs stage scripts in subprocesses

N_RATINGS = 200
REWARD = ["--train_reward_num_epochs=15", "--train_reward_batch_size=32", "--train_reward_test_split_ratio=0.2"]
PLOT_SIZE = (1000, 360)  # plot_curves: 5 x 3.6 inches per panel at 100 dpi, two panels


def read_metrics(folder):
    return read_jsonl(os.path.join(folder, "models", "reward_metrics.jsonl"))


def assert_valid_plot(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == PLOT_SIZE
        colours = image.convert("L").getextrema()
    assert colours[0] < 100 < colours[1], "the plot is blank"


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """train_reward run on a rule it can learn; returns (folder, result, offsets)."""
    folder = tmp_path_factory.mktemp("learnable")
    latents, scores, offsets = brightness_like_round(N_RATINGS)
    write_rated_round(folder / "samples", latents, scores, pngs=True)
    return folder, assert_ok(run_script("train_reward", *REWARD, cwd=folder)), offsets


def test_a_learnable_rule_is_learned_and_measured_so(learnable):
    folder, result, _ = learnable
    records = read_metrics(folder)
    assert [r["epoch"] for r in records] == list(range(1, 16))
    for record in records:
        for key in ("train_loss", "test_loss", "test_pearson", "test_spearman", "test_pairwise_accuracy"):
            assert math.isfinite(record[key]), (key, record)
    best = min(records, key=lambda r: r["test_loss"])
    assert best["test_pearson"] > 0.8 and best["test_spearman"] > 0.8 and best["test_pairwise_accuracy"] > 0.8, best
    assert "warning" not in result.stdout


def test_the_saved_model_is_the_epoch_with_the_best_test_loss(learnable):
    folder, _, _ = learnable
    records = read_metrics(folder)
    best = min(records, key=lambda r: r["test_loss"])
    metadata = reward_model_metadata(str(folder / "models" / "reward_model.safetensors"))
    assert metadata["epoch"] == best["epoch"] and metadata["test_pearson"] == pytest.approx(best["test_pearson"])
    assert metadata["num_ratings"] == N_RATINGS and metadata["latent_shape"] == [4, 8, 8]


def test_the_metrics_plot_is_a_png_with_curves(learnable):
    folder, result, _ = learnable
    assert_valid_plot(folder / "models" / "reward_metrics.png")
    assert "reward_metrics.png" in result.stdout


def test_random_scores_give_a_correlation_near_zero_and_a_warning(tmp_path):
    latents, _, _ = brightness_like_round(N_RATINGS)
    scores = torch.randint(-5, 6, (N_RATINGS,), generator=torch.Generator().manual_seed(1))
    write_rated_round(tmp_path / "samples", latents, scores)
    result = assert_ok(run_script("train_reward", *REWARD, cwd=tmp_path))
    best = min(read_metrics(tmp_path), key=lambda r: r["test_loss"])
    assert abs(best["test_pearson"]) < 0.3, best
    assert "warning: the reward model's test correlation is only" in result.stdout
    assert "not learned your taste well enough to train a policy on" in result.stdout
    assert_valid_plot(tmp_path / "models" / "reward_metrics.png")


def test_too_few_ratings_for_the_test_split_are_warned_about(tmp_path):
    latents, scores, _ = brightness_like_round(20)
    write_rated_round(tmp_path / "samples", latents, scores)
    result = assert_ok(run_script("train_reward", "--train_reward_num_epochs=2", cwd=tmp_path))
    assert "warning: only 2 ratings held out for testing" in result.stdout


def test_rank_folder_ranks_by_what_the_model_learned_and_writes_only_to_models(learnable, tmp_path):
    trained, _, _ = learnable
    latents, _, offsets = brightness_like_round(30, seed=7)  # images the model has never seen
    folder = tmp_path / "to_rank"
    write_rated_round(folder, latents, torch.zeros(30), pngs=True)
    os.remove(folder / "scores.json")
    before = snapshot(folder)
    result = assert_ok(run_script("train_reward", f"--rank_folder={folder}", cwd=trained))
    assert snapshot(folder) == before, "rank mode wrote into the ranked folder"
    with open(trained / "models" / "ranking.json") as f:
        ranking = json.load(f)["ranking"]
    assert [r["rank"] for r in ranking] == list(range(1, 31))
    assert sorted(r["image"] for r in ranking) == sorted(f"{i}.png" for i in range(30))
    predicted = [r["score"] for r in ranking]
    assert predicted == sorted(predicted, reverse=True)
    by_offset = torch.tensor([offsets[int(r["image"][:-4])].item() for r in ranking])
    assert spearman(torch.tensor(predicted), by_offset) > 0.8
    assert f"     1  {predicted[0]:+.3f}  {ranking[0]['image']}" in result.stdout
    with Image.open(trained / "models" / "ranking.png") as sheet:
        assert sheet.format == "PNG" and sheet.size == (8 * 128, 4 * (128 + 34))  # 30 images, 8 a row


def test_rank_folder_vae_encodes_images_without_saved_latents(learnable, tmp_path, tiny_checkpoint):
    trained, _, _ = learnable
    folder = tmp_path / "photos"
    folder.mkdir()
    for grey in (30, 90, 150, 210):
        Image.new("RGB", (96, 80), (grey, grey, grey)).save(folder / f"grey_{grey}.jpg")
    result = assert_ok(run_script("train_reward", f"--rank_folder={folder}", cwd=trained, checkpoint=tiny_checkpoint))
    assert "VAE-encoding 4 images" in result.stdout
    with open(trained / "models" / "ranking.json") as f:
        assert len(json.load(f)["ranking"]) == 4
    assert sorted(os.listdir(folder)) == [f"grey_{grey}.jpg" for grey in (150, 210, 30, 90)]


def test_rank_folder_that_holds_no_images_is_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_script("train_reward", f"--rank_folder={tmp_path / 'empty'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --rank_folder=") and "images" in result.stderr
