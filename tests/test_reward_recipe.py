"""train_reward_recipe: one setting for the reward-training values, explicit settings win, and train_reward
says what the other recipe measured when it trains upstream's on few ratings. In-process, on 8x8 latents."""

import json

import pytest
import torch

import config
import train_reward
from utils.cli import REWARD_RECIPES, SettingsError, parse_settings
from utils.samples import latent_file, save_latent

FEW_RATINGS = {"train_reward_loss": "ranking", "train_reward_batch_size": 32, "train_reward_learning_rate": 3e-3}


def reward_settings(settings):
    return {name: getattr(settings, name) for name in FEW_RATINGS}


def test_upstream_is_the_default_and_config_py_holds_its_values():
    assert config.train_reward_recipe == "upstream"
    assert reward_settings(config) == REWARD_RECIPES["upstream"]
    assert reward_settings(parse_settings([])) == REWARD_RECIPES["upstream"]


def test_few_ratings_sets_its_values():
    assert reward_settings(parse_settings(["--train_reward_recipe=few_ratings"])) == FEW_RATINGS


def test_an_explicit_flag_wins_over_the_recipe_even_when_it_names_upstreams_value():
    settings = parse_settings(["--train_reward_batch_size=100", "--train_reward_recipe=few_ratings"])
    assert reward_settings(settings) == {**FEW_RATINGS, "train_reward_batch_size": 100}


def test_a_config_py_edit_wins_over_the_recipe(monkeypatch):
    monkeypatch.setattr(config, "train_reward_learning_rate", 5e-4)
    settings = parse_settings(["--train_reward_recipe=few_ratings"])
    assert reward_settings(settings) == {**FEW_RATINGS, "train_reward_learning_rate": 5e-4}


def test_help_shows_the_values_the_recipe_gives(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--help", "--train_reward_recipe=few_ratings"], train_reward.USED_SETTINGS)
    out = capsys.readouterr().out
    assert "--train_reward_batch_size=32" in out and "--train_reward_loss=ranking" in out


def test_an_unknown_recipe_is_one_sentence_naming_the_recipes():
    with pytest.raises(SettingsError) as refusal:
        parse_settings(["--train_reward_recipe=seed"])
    assert str(refusal.value) == "train_reward_recipe must be 'upstream' or 'few_ratings' (got 'seed')."


def rated_round(tmp_path, count=12):
    samples = tmp_path / "samples"
    generator = torch.Generator().manual_seed(0)
    for seed in range(count):
        save_latent(latent_file(str(samples), f"{seed}.png"), torch.randn(4, 8, 8, generator=generator))
    (samples / "scores.json").write_text(json.dumps({f"{seed}.png": seed % 11 - 5 for seed in range(count)}))
    return [f"--sample_path={samples}", f"--model_path={tmp_path / 'models'}", "--device=cpu",
            "--train_reward_num_epochs=1", "--train_reward_ensemble_size=1"]


@pytest.mark.parametrize("recipe, hinted", [("upstream", True), ("few_ratings", False)])
def test_train_reward_points_to_few_ratings_when_it_trains_upstreams_recipe_on_few(tmp_path, capsys, recipe, hinted):
    settings = parse_settings(rated_round(tmp_path) + [f"--train_reward_recipe={recipe}"], train_reward.USED_SETTINGS)
    train_reward.main(settings)
    notes = [line for line in capsys.readouterr().out.splitlines() if "--train_reward_recipe=few_ratings" in line]
    assert len(notes) == hinted
    if hinted:
        assert "Spearman 0.88 against upstream's 0.65" in notes[0] and "docs/rating-efficiency.md" in notes[0]
