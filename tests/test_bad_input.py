"""Bad input, each as a user meets it: the script exits 2 with one line "error: ..." that names the problem,
no traceback, and every file is as it was. A rated entry whose image is gone is skipped and counted.

Each kind of mistake is run once through a real script, in a subprocess in a folder of its own; the
runs go side by side, since each is mostly a few seconds of imports. Variants of a mistake are then
checked in-process against the function that decides, which is fast.
"""

import json

import pytest
import torch
from PIL import Image

import config
from conftest import run_scripts, snapshot, stage_paths
from train_reward import read_scores
from utils.cli import SettingsError, UserError, parse_settings
from utils.samples import latent_file, save_latent

ROUND = [101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112]
VALID_SCORES = {f"{seed}.png": i % 11 - 5 for i, seed in enumerate(ROUND)}
NO_SCORES = object()


def rated_round(scores):
    """Setup: a round as generate writes it (PNGs and their latents) with `scores` as its scores.json
    (a str is written as it is; NO_SCORES writes none). No checkpoint is needed: every latent is saved."""

    def setup(folder):
        samples = folder / "samples"
        samples.mkdir()
        generator = torch.Generator().manual_seed(0)
        for seed in ROUND:
            Image.new("RGB", (64, 64), (seed, 0, 0)).save(samples / f"{seed}.png")
            save_latent(latent_file(str(samples), f"{seed}.png"), torch.randn(4, 8, 8, generator=generator))
        if scores is not NO_SCORES:
            (samples / "scores.json").write_text(scores if isinstance(scores, str) else json.dumps(scores))

    return setup


def empty(folder):
    """Setup: nothing at all, not even a checkpoint."""


# case: (setup, script, arguments, words the one error line must hold). Words and arguments are
# formatted with the case folder's stage_paths and {tiny_checkpoint}.
FILE_REFUSALS = {
    "no checkpoint folder": (empty, "generate", ["--generate_sample_size=2"],
                             ["{checkpoint_path}", "model_index.json", "tiny_checkpoint"]),
    "no reward model": (empty, "train_policy", ["--checkpoint_path={tiny_checkpoint}"],
                        ["{reward_model_path}", "train_reward.py"]),
    "scores.json missing": (rated_round(NO_SCORES), "train_reward", [], ["{score_path}", "not found"]),
    "scores.json not JSON": (rated_round('{"101.png": 3, "102.png": '), "train_reward", [],
                             ["{score_path}", "not valid JSON"]),
    "score out of range": (rated_round({"101.png": 1, "102.png": 6, "103.png": -2}), "train_reward", [],
                           ["{score_path}", "'102.png'", "6", "-5 to 5"]),
    "score 2.5": (rated_round({"101.png": 1, "102.png": -2, "103.png": 2.5}), "train_reward", [],
                  ["{score_path}", "'103.png'", "2.5", "whole number"]),
    "score '3'": (rated_round({"101.png": 1, "102.png": -2, "103.png": "3"}), "train_reward", [],
                  ["{score_path}", "'103.png'", "'3'", "whole number"]),
}
# Settings are refused before any model loads: these folders hold no checkpoint, and the settings
# error must come first, with nothing else printed (no "LoRA: ...", no progress).
SETTINGS_REFUSALS = {
    "unknown setting": (empty, "train_reward", ["--lora_rnak=8"], ["Unknown setting --lora_rnak", "--lora_rank"]),
    "mistyped setting": (empty, "generate", ["--height=abc"], ["--height", "'abc'", "whole number"]),
    "eta=0": (empty, "train_policy", ["--eta=0"], ["eta", "> 0"]),
    "height not a multiple of 8": (empty, "generate", ["--height=100"], ["height", "multiple of 8", "100"]),
    "batch arithmetic": (empty, "train_policy",
                         ["--train_sample_batch_size=3", "--train_sample_num_batches_per_epoch=1",
                          "--train_policy_batch_size=2"],
                         ["3 images per epoch", "divisible", "train_policy_batch_size = 2"]),
}
MISSING_IMAGE = "an entry naming a missing image"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint):
    """Every case above, and a round with one rated image gone, run side by side.

    {case: (folder, its stage_paths, the CompletedProcess, files before, files after)}
    """
    cases = {**FILE_REFUSALS, **SETTINGS_REFUSALS,
             MISSING_IMAGE: (rated_round({**VALID_SCORES, "999.png": 4}), "train_reward",
                             ["--train_reward_num_epochs=1", "--train_reward_batch_size=4",
                              "--train_reward_test_split_ratio=0.25"], [])}
    prepared, calls = {}, []
    for case, (setup, script, arguments, _) in cases.items():
        folder = tmp_path_factory.mktemp("bad_input")
        setup(folder)
        paths = {**stage_paths(folder), "tiny_checkpoint": tiny_checkpoint}
        prepared[case] = (folder, paths, snapshot(folder))
        calls.append((script, [a.format(**paths) for a in arguments], {"cwd": folder}))
    results = run_scripts(calls)
    return {case: (folder, paths, result, before, snapshot(folder))
            for (case, (folder, paths, before)), result in zip(prepared.items(), results)}


def assert_refused(result, *words):
    """Exit 2, exactly one stderr line "error: ..." holding every word, no traceback; returns the line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("case", FILE_REFUSALS)
def test_a_missing_or_malformed_file_is_refused_and_nothing_changes(runs, case):
    folder, paths, result, before, after = runs[case]
    assert_refused(result, *[word.format(**paths) for word in FILE_REFUSALS[case][3]])
    assert after == before, "a refused run must leave every file as it was"


@pytest.mark.parametrize("case", SETTINGS_REFUSALS)
def test_a_bad_setting_is_refused_at_start_up(runs, case):
    folder, paths, result, before, after = runs[case]
    line = assert_refused(result, *SETTINGS_REFUSALS[case][3])
    assert "checkpoint" not in line and result.stdout == ""
    assert after == before


def test_train_reward_skips_and_counts_an_entry_whose_image_is_gone(runs):
    folder, paths, result, before, after = runs[MISSING_IMAGE]
    assert result.returncode == 0, result.stderr
    assert "skipped 1 " in result.stdout
    assert f"{len(ROUND)} ratings" in result.stdout
    assert (folder / "models" / "reward_model.safetensors").is_file()
    # the ratings are untouched; the only new file is the order train_reward suggests for rating the round
    assert {k: v for k, v in after.items() if k.startswith("samples") and k != "samples/rating_order.json"} == before
    assert "samples/rating_order.json" in after


# ---------------------------------------------------------------- the variants, in-process


@pytest.mark.parametrize("content, words", [
    ({"1.png": -6}, ["'1.png'", "-6"]),
    ({"1.png": 100}, ["'1.png'", "100"]),
    ({"1.png": 2, "2.png": True}, ["'2.png'", "True"]),
    ({"1.png": None}, ["'1.png'", "None"]),
    ({"1.png": 1.0}, ["'1.png'", "1.0"]),
    ([3, 4], ["list"]),
    ("3", ["str"]),
])
def test_every_malformed_scores_json_is_refused_naming_the_entry(tmp_path, content, words):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError) as refusal:
        read_scores(str(path))
    for word in [str(path), *words]:
        assert word in str(refusal.value)


def test_a_valid_scores_json_is_read_as_written(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"1.png": -5, "2.png": 0, "3.png": 5}))
    assert read_scores(str(path)) == {"1.png": -5, "2.png": 0, "3.png": 5}


@pytest.mark.parametrize("arguments, words", [
    (["--lora_rnak=8"], ["--lora_rank"]),
    (["--train_policy_epochs=3"], ["--train_policy_num_epochs"]),
    (["--zzzz=1"], ["--help"]),
    (["--eta=high"], ["--eta", "'high'", "number"]),
    (["--generate_vae_slicing=maybe"], ["--generate_vae_slicing", "True or False"]),
    (["height=64"], ["--name=value", "'height=64'"]),
    (["--eta=-0.5"], ["eta", "> 0"]),
    (["--width=36"], ["width", "multiple of 8", "36"]),
    (["--height=0"], ["height", "multiple of 8"]),
    (["--train_reward_num_epochs=0"], ["train_reward_num_epochs", "at least 1"]),
    (["--train_sample_batch_size=4", "--train_sample_num_batches_per_epoch=3", "--train_policy_batch_size=5"],
     ["12 images per epoch", "train_policy_batch_size = 5"]),
])
def test_every_bad_setting_is_one_sentence_naming_it(arguments, words):
    with pytest.raises(SettingsError) as refusal:
        parse_settings(["--device=cpu", *arguments])
    message = str(refusal.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_settings_parse_types_and_the_last_value_wins():
    settings = parse_settings(["--device=cpu", "--height=64", "--height=128", "--eta=0.5", "--generate_vae_slicing=false",
                             "--prompt=a cat, at night"])
    assert (settings.height, settings.eta, settings.generate_vae_slicing) == (128, 0.5, False)
    assert settings.prompt == "a cat, at night"
    assert settings.width == config.width  # untouched settings keep config.py's value


def test_help_lists_the_stages_settings_with_their_values(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_settings(["--device=cpu", "--height=64", "--help"], ["generate_lora", "height"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--generate_lora=latest" in out and "--height=64" in out
    assert "--train_clip_range" not in out
