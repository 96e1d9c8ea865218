"""Two processes through `accelerate launch` on CPU (gloo), as a user with two GPUs would run the stages.

`--multi_gpu` is what makes accelerate start several processes (with torchrun); the stages ask for the
CPU themselves (--device=cpu), so the processes talk over gloo. Each run goes through
tests/stage_probe.py, which records per process the LoRA's checksum after every epoch (train_policy)
or the seeds it saved (generate).
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO, TINY_SETTINGS, assert_ok, run_script, stage_paths
from utils.metrics import read_jsonl

pytestmark = pytest.mark.stages  # every test here runs stage scripts in subprocesses

POLICY = ["--train_sample_batch_size=2", "--train_sample_num_batches_per_epoch=2", "--train_save_freq=1",
          "--train_preview_seeds=0"]


def launch(stage, probe_dir, *args, cwd, checkpoint):
    """`accelerate launch` of stage_probe.py on 2 CPU processes, with every path in `cwd`."""
    with socket.socket() as s:  # a free port, so that runs beside this one cannot collide on torchrun's default
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = {**stage_paths(cwd, checkpoint), **TINY_SETTINGS}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}",
               str(REPO / "tests" / "stage_probe.py"), stage, str(probe_dir),
               *(f"--{k}={v}" for k, v in settings.items()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return assert_ok(subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300))


def probed(probe_dir):
    """[entries of rank 0, entries of rank 1]."""
    return [read_jsonl(str(probe_dir / f"rank{rank}.jsonl")) for rank in (0, 1)]


def metrics(folder):
    return read_jsonl(str(folder / "outputs" / "policy_metrics.jsonl"))


def saved_files(epochs):
    names = {"policy_metrics.jsonl", "policy_metrics.png", "resume_state.pt"}
    for epoch in epochs:
        names |= {f"diffusers_lora_epoch_{epoch}.safetensors", f"ui_lora_epoch_{epoch}.safetensors",
                  f"ui_lora_epoch_{epoch}.preview.png", f"optimizer_epoch_{epoch}.pt", f"preview_epoch_{epoch}.png"}
    return names


@pytest.fixture(scope="module")
def reward_model(random_reward_model):
    return random_reward_model


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_checkpoint, reward_model):
    folder, probe_dir = tmp_path_factory.mktemp("two_processes"), tmp_path_factory.mktemp("probe")
    result = launch("train_policy", probe_dir, f"--reward_model_path={reward_model}", "--train_policy_num_epochs=2",
                    *POLICY, cwd=folder, checkpoint=tiny_checkpoint)
    return folder, probe_dir, result


def test_two_processes_write_one_set_of_files(two_process_run):
    folder, _, result = two_process_run
    assert set(os.listdir(folder / "outputs")) == saved_files([1, 2])
    assert [m["epoch"] for m in metrics(folder)] == [1, 2]
    assert result.stdout.count("epoch 1: reward") == 1  # only the main process prints


def test_lora_weights_are_identical_across_processes_after_each_update(two_process_run):
    _, probe_dir, _ = two_process_run
    rank0, rank1 = probed(probe_dir)
    assert len(rank0) == len(rank1) == 2
    assert rank0 == rank1
    assert rank0[0] != rank0[1]  # and the updates did change them


def test_rewards_of_an_epoch_equal_a_single_process_run(two_process_run, tmp_path, tiny_checkpoint, reward_model):
    folder, _, _ = two_process_run
    assert_ok(run_script("train_policy", f"--reward_model_path={reward_model}", "--train_policy_num_epochs=1",
                         *POLICY, "--train_preview_seeds=", cwd=tmp_path, checkpoint=tiny_checkpoint))
    single, double = metrics(tmp_path)[0], metrics(folder)[0]
    # Seeds are per image, not per process, and the rewards are gathered before the advantages are
    # normalised: the same images, so the same statistics.
    assert single["reward_mean"] == pytest.approx(double["reward_mean"], rel=1e-5, abs=1e-7)
    assert single["reward_std"] == pytest.approx(double["reward_std"], rel=1e-5)


def test_two_processes_resume(two_process_run, tiny_checkpoint, reward_model, tmp_path):
    folder, _, _ = two_process_run
    result = launch("train_policy", tmp_path, f"--reward_model_path={reward_model}", "--train_policy_num_epochs=3",
                    *POLICY, cwd=folder, checkpoint=tiny_checkpoint)
    assert result.stdout.count("resuming after epoch 2") == 1
    assert set(os.listdir(folder / "outputs")) == saved_files([1, 2, 3])
    assert [m["epoch"] for m in metrics(folder)] == [1, 2, 3]
    rank0, rank1 = probed(tmp_path)
    assert rank0 == rank1 and len(rank0) == 1


def test_generate_makes_each_seed_once(tmp_path, tiny_checkpoint):
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    launch("generate", probe_dir, "--generate_sample_size=6", "--generate_batch_size=2", "--generate_lora=none",
           cwd=tmp_path, checkpoint=tiny_checkpoint)
    with open(tmp_path / "samples" / "round.json") as f:
        seeds = json.load(f)["seeds"]
    made = [[entry["seed"] for entry in rank] for rank in probed(probe_dir)]
    assert all(made), "each process makes a share"
    assert sorted(made[0] + made[1]) == sorted(seeds) and len(set(seeds)) == 6
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == sorted(f"{s}.png" for s in seeds)
