"""Kills at chosen moments (SIGKILL through the ALMOSTPERFECT_CRASH_AT hook of utils/files.crash_point) and
two processes on one samples folder, with the real scripts: no round is mixed, no rating dropped, and a
rerun finishes the work."""

import json
import os
import signal
import subprocess
import sys

import pytest
from helpers import write_red_round
from score_round import serving

import train_reward
from conftest import REPO, assert_ok, run_script, running_stage, snapshot, stage_command
from utils.cli import parse_settings
from utils.errors import UserError
from utils.samples import (
    archive_round,
    finish_interrupted_archive,
    history_rounds,
    interrupted_archives,
    latent_file,
    round_images,
)

SEEDS = [11, 12, 13, 14]


def rated_round(samples):
    """A round as generate leaves it, rated: PNGs, latents, round.json, scores.json."""
    write_red_round(samples, SEEDS, 9, {seed: seed - 13 for seed in SEEDS}, round_json=True)
    return {path: entry for path, entry in snapshot(samples).items() if not path.startswith("history")}


def archive_in_a_process(samples, crash_at):
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r}); "
              "from utils.samples import archive_round; archive_round(sys.argv[1])")
    return subprocess.run([sys.executable, "-c", script, str(samples)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ALMOSTPERFECT_CRASH_AT": crash_at})


@pytest.mark.parametrize("crash_at", ["archive_round.moved_one", "archive_round.all_moved"])
def test_an_archive_killed_midway_is_finished_by_the_next_start_whole(tmp_path, crash_at):
    samples = tmp_path / "samples"
    before = rated_round(samples)
    result = archive_in_a_process(samples, crash_at)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert len(interrupted_archives(str(samples))) == 1 and history_rounds(str(samples)) == []
    # the half-moved round is neither trained on half nor mistaken for a round
    settings = parse_settings([f"--sample_path={samples}", "--device=cpu"], train_reward.USED_SETTINGS)
    with pytest.raises(UserError, match="interrupted.*generate.py"):
        train_reward.rated_rounds(settings)
    finish_interrupted_archive(str(samples))
    assert sorted(os.listdir(samples)) == ["history"]
    assert snapshot(samples / "history" / "round_001") == before  # every file, byte for byte, in one round
    assert interrupted_archives(str(samples)) == []


def test_archiving_twice_never_mixes_rounds(tmp_path):
    samples = tmp_path / "samples"
    first = rated_round(samples)
    archive_round(str(samples))
    second = rated_round(samples)
    archive_round(str(samples))
    assert snapshot(samples / "history" / "round_001") == first
    assert snapshot(samples / "history" / "round_002") == second
    assert archive_round(str(samples)) is None  # nothing left to move


@pytest.mark.stages
def test_generate_killed_between_latent_and_png_resumes_the_same_round(tmp_path, tiny_checkpoint):
    args = ["--generate_sample_size=3", "--generate_batch_size=1", "--generate_lora=none"]
    command, env = stage_command("generate", *args, cwd=tmp_path, checkpoint=tiny_checkpoint,
                                 env={"ALMOSTPERFECT_CRASH_AT": "generate.latent_saved"})
    killed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    samples = tmp_path / "samples"
    seeds = json.loads((samples / "round.json").read_text())["seeds"]
    assert round_images(str(samples)) == []  # the PNG, written last, marks a complete image: none yet
    assert (samples / ".lock").exists()  # left by the killed process

    resumed = assert_ok(run_script("generate", *args, cwd=tmp_path, checkpoint=tiny_checkpoint))
    assert "0 of 3 images already made, generating 3" in resumed.stdout
    assert json.loads((samples / "round.json").read_text())["seeds"] == seeds  # the same round, not a new one
    assert round_images(str(samples)) == [f"{seed}.png" for seed in sorted(seeds)]
    assert all(os.path.isfile(latent_file(str(samples), f"{seed}.png")) for seed in seeds)
    assert not (samples / "history").exists() and not (samples / ".lock").exists()


@pytest.mark.stages
def test_generate_killed_while_archiving_the_rated_round_keeps_it_whole(tmp_path, tiny_checkpoint):
    samples = tmp_path / "samples"
    before = rated_round(samples)
    args = ["--generate_sample_size=2", "--generate_lora=none"]
    command, env = stage_command("generate", *args, cwd=tmp_path, checkpoint=tiny_checkpoint,
                                 env={"ALMOSTPERFECT_CRASH_AT": "archive_round.moved_one"})
    killed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_ok(run_script("generate", *args, cwd=tmp_path, checkpoint=tiny_checkpoint))
    assert snapshot(samples / "history" / "round_001") == before
    assert len(round_images(str(samples))) == 2 and not (samples / "scores.json").exists()


@pytest.mark.stages
def test_a_second_generate_or_generate_under_the_rating_page_is_refused_at_start(tmp_path, tiny_checkpoint):
    samples = tmp_path / "samples"
    with running_stage("generate", "--generate_sample_size=100000", "--generate_lora=none", cwd=tmp_path,
                       checkpoint=tiny_checkpoint, until="generating") as first:
        round_file = (samples / "round.json").read_bytes()
        second = run_script("generate", "--generate_sample_size=2", "--prompt=another round", cwd=tmp_path,
                            checkpoint=tiny_checkpoint)
        assert first.poll() is None, "the first run must still be running for this test to mean anything"
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip() == second.stderr.strip().splitlines()[0]
    assert f"in use by generate (pid {first.pid}" in second.stderr and str(samples) in second.stderr
    assert (samples / "round.json").read_bytes() == round_file and not (samples / "history").exists()

    # the killed run's lock is stale; now the rating page holds the folder, and generate is refused again
    with serving(samples, samples / "scores.json"):
        under_page = run_script("generate", "--generate_sample_size=2", cwd=tmp_path, checkpoint=tiny_checkpoint)
    assert under_page.returncode == 2 and f"in use by score (pid {os.getpid()}" in under_page.stderr
    assert (samples / "round.json").read_bytes() == round_file
