"""Bad input, each as a user meets it: the script exits 2 with one line "error: ..." that names the problem,
no traceback, and every file is as it was. A rated entry whose image is gone is skipped and counted.

One mistake per stage is run through the real script, in a subprocess in a folder of its own (the runs
go side by side, since each is mostly a few seconds of imports); every other case goes through the same
command line and the stage's own run_stage in this process, which is fast. Variants of a mistake are then
checked against the function that decides.
"""

import json
import os
import resource
import signal
import subprocess

import pytest
import torch
from PIL import Image

from conftest import assert_refused, run_in_process, run_scripts, snapshot, stage_command, stage_paths
from utils.errors import UserError
from utils.ratings import read_scores
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


def with_file(relative_path, content, then=empty):
    """Setup: `then`, and `content` (bytes) written at folder/relative_path."""

    def setup(folder):
        then(folder)
        (folder / relative_path).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative_path).write_bytes(content)

    return setup


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
    "reward model not safetensors": (with_file("models/reward_model.safetensors", b"\x80\x04garbage" * 50),
                                     "train_policy", ["--checkpoint_path={tiny_checkpoint}"],
                                     ["{reward_model_path}", "train_reward.py"]),
    "LoRA to generate with truncated": (with_file("outputs/diffusers_lora_epoch_3.safetensors", b"\x10\x00" * 40),
                                        "generate", ["--checkpoint_path={tiny_checkpoint}", "--generate_sample_size=1"],
                                        ["{lora_path}diffusers_lora_epoch_3.safetensors", "not a readable"]),
    "round.json truncated": (with_file("samples/round.json", b'{"parameters": {"prompt": "a', rated_round(NO_SCORES)),
                             "generate", ["--checkpoint_path={tiny_checkpoint}", "--generate_lora=none"],
                             ["{sample_path}round.json", "move it away"]),
    "models is a file": (with_file("models", b"", rated_round(VALID_SCORES)), "train_reward",
                         ["--train_reward_num_epochs=1"], ["cannot use {model_path}", "check that path"]),
    "latent truncated": (with_file("samples/latents/105.safetensors", b"\x08\x00\x00", rated_round(VALID_SCORES)),
                         "train_reward", [], ["{sample_path}latents/105.safetensors", "move it away"]),
}
# Settings are refused before any model loads: this folder holds no checkpoint, and the settings
# error must come first, with nothing else printed (no "LoRA: ...", no progress). One run holds the
# contract for every setting; tests/test_settings.py checks the messages in-process.
SETTINGS_REFUSALS = {
    "batch arithmetic": (empty, "train_policy",
                         ["--train_sample_batch_size=3", "--train_sample_num_batches_per_epoch=1",
                          "--train_policy_batch_size=2"],
                         ["3 images per epoch", "divisible", "train_policy_batch_size = 2"]),
}
MISSING_IMAGE = "an entry naming a missing image"
CASES = {**FILE_REFUSALS, **SETTINGS_REFUSALS,
         MISSING_IMAGE: (rated_round({**VALID_SCORES, "999.png": 4}), "train_reward",
                         ["--train_reward_num_epochs=1", "--train_reward_batch_size=4",
                          "--train_reward_test_split_ratio=0.25"], [])}
# One real process per stage holds the contract (exit 2, one line on stderr, no traceback, whatever the
# stage imports or prints on the way); the other cases go through the same run_stage in this process.
IN_A_SUBPROCESS = ["no checkpoint folder", "scores.json not JSON", "batch arithmetic"]
assert sorted(CASES[case][1] for case in IN_A_SUBPROCESS) == ["generate", "train_policy", "train_reward"]


def prepared(case, folder, tiny_checkpoint):
    """Set up the case in `folder`; returns (its stage_paths, the stage's arguments, files before)."""
    setup, _, arguments, _ = CASES[case]
    setup(folder)
    paths = {**stage_paths(folder), "tiny_checkpoint": tiny_checkpoint}
    return paths, [a.format(**paths) for a in arguments], snapshot(folder)


@pytest.fixture(scope="module")
def subprocess_runs(tmp_path_factory, tiny_checkpoint):
    """The IN_A_SUBPROCESS cases, each a real script in a folder of its own, side by side.

    {case: (folder, its stage_paths, the CompletedProcess, files before, files after)}
    """
    folders = {case: tmp_path_factory.mktemp("bad_input") for case in IN_A_SUBPROCESS}
    cases = {case: prepared(case, folders[case], tiny_checkpoint) for case in IN_A_SUBPROCESS}
    results = run_scripts([(CASES[case][1], arguments, {"cwd": folders[case]})
                           for case, (_, arguments, _) in cases.items()])
    return {case: (folders[case], paths, result, before, snapshot(folders[case]))
            for (case, (paths, _, before)), result in zip(cases.items(), results)}


@pytest.fixture
def run(request, tmp_path, tiny_checkpoint):
    """(folder, its stage_paths, the result, files before, files after) of the case the test is parametrized with."""
    case = request.node.callspec.params["case"]
    if case in IN_A_SUBPROCESS:
        return request.getfixturevalue("subprocess_runs")[case]
    paths, arguments, before = prepared(case, tmp_path, tiny_checkpoint)
    result = run_in_process(CASES[case][1], *arguments, cwd=tmp_path)
    return tmp_path, paths, result, before, snapshot(tmp_path)


def cases(table):
    """The table's cases as parameters, the ones that start a process marked `stages`."""
    return [pytest.param(case, marks=pytest.mark.stages) if case in IN_A_SUBPROCESS else case for case in table]


@pytest.mark.parametrize("case", cases(FILE_REFUSALS))
def test_a_missing_or_malformed_file_is_refused_and_nothing_changes(run, case):
    folder, paths, result, before, after = run
    assert_refused(result, *[word.format(**paths) for word in FILE_REFUSALS[case][3]])
    assert after == before, "a refused run must leave every file as it was"


@pytest.mark.parametrize("case", cases(SETTINGS_REFUSALS))
def test_a_bad_setting_is_refused_at_start_up(run, case):
    folder, paths, result, before, after = run
    line = assert_refused(result, *SETTINGS_REFUSALS[case][3])
    assert "checkpoint" not in line and result.stdout == ""
    assert after == before


@pytest.mark.parametrize("case", [MISSING_IMAGE])
def test_train_reward_skips_and_counts_an_entry_whose_image_is_gone(run, case):
    folder, paths, result, before, after = run
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


@pytest.mark.stages
def test_a_full_disk_is_one_sentence_naming_the_file_and_the_saved_model_is_kept(tmp_path):
    """A file-size limit makes the kernel refuse writes as a full disk would (EFBIG, like ENOSPC)."""
    rated_round(VALID_SCORES)(tmp_path)
    saved = tmp_path / "models" / "reward_model.safetensors"
    saved.parent.mkdir()
    saved.write_bytes(b"the model trained last week")

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the reward model is 8 MB

    command, env = stage_command("train_reward", "--train_reward_num_epochs=1", "--train_reward_test_split_ratio=0.25",
                                 cwd=tmp_path)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                            preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: no space left to write {saved} (File too large): free some disk space "
                                     "and run the same command again; everything saved before is kept.")
    assert saved.read_bytes() == b"the model trained last week"
    assert sorted(os.listdir(saved.parent)) == ["reward_metrics.jsonl", "reward_model.safetensors"]  # no temp file
