"""A kill loses at most the epoch in progress: train_policy keeps a resume state after every epoch, an
interrupted save is completed by the next run, and a metrics line half-written by a kill is dropped."""

import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_ok, run_script, running_stage, stage_command
from utils.metrics import read_jsonl
from utils.run_state import STATE_FILE

pytestmark = pytest.mark.stages  # every test here runs stage scripts in subprocesses

POLICY = ["--train_sample_batch_size=2", "--train_sample_num_batches_per_epoch=2", "--train_policy_batch_size=2",
          "--train_policy_learning_rate=1e-2", "--train_preview_seeds=0"]


@pytest.fixture(scope="module")
def reward_model(random_reward_model):
    return random_reward_model


def policy_args(reward_model, epochs, save_freq):
    return [f"--reward_model_path={reward_model}", f"--train_policy_num_epochs={epochs}",
            f"--train_save_freq={save_freq}", *POLICY]


def epochs_in_metrics(folder):
    return [record["epoch"] for record in read_jsonl(str(folder / "outputs" / "policy_metrics.jsonl"))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_checkpoint, reward_model):
    folder = tmp_path_factory.mktemp("uninterrupted")
    assert_ok(run_script("train_policy", *policy_args(reward_model, 4, 10), cwd=folder, checkpoint=tiny_checkpoint))
    return load_file(folder / "outputs" / "diffusers_lora_epoch_4.safetensors")


def state_epoch(path):
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


def test_a_kill_between_saves_loses_at_most_the_epoch_in_progress(tmp_path, tiny_checkpoint, reward_model,
                                                                  uninterrupted):
    # saves every 10 epochs: only epoch 4, the last, is saved
    command, env = stage_command("train_policy", *policy_args(reward_model, 4, 10), cwd=tmp_path,
                                 checkpoint=tiny_checkpoint)
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "outputs" / STATE_FILE
    deadline = time.monotonic() + 240
    while state_epoch(state) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_after = state_epoch(state)
    assert 2 <= killed_after < 4, "the kill must come after epoch 2 and before the end"
    assert not list((tmp_path / "outputs").glob("*lora_epoch_*"))  # nothing saved yet: only the state

    result = assert_ok(run_script("train_policy", *policy_args(reward_model, 4, 10), cwd=tmp_path,
                                  checkpoint=tiny_checkpoint))
    assert f"resuming after epoch {killed_after} from" in result.stdout
    assert f"epoch {killed_after}: reward" not in result.stdout and "epoch 4: reward" in result.stdout
    assert epochs_in_metrics(tmp_path) == [1, 2, 3, 4]  # a line of the killed epoch, if written, was dropped
    resumed = load_file(tmp_path / "outputs" / "diffusers_lora_epoch_4.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), "the same LoRA as without the kill"


def test_an_interrupted_save_is_completed_by_the_next_run_and_a_half_metrics_line_dropped(
        tmp_path, tiny_checkpoint, reward_model):
    assert_ok(run_script("train_policy", *policy_args(reward_model, 2, 2), cwd=tmp_path, checkpoint=tiny_checkpoint))
    outputs = tmp_path / "outputs"
    saved = load_file(outputs / "diffusers_lora_epoch_2.safetensors")
    # What a kill during the save leaves: the state, the optimizer, the preview and the WebUI file are
    # written, the diffusers LoRA (written last) is not; and a kill during a metrics append leaves half a line.
    (outputs / "diffusers_lora_epoch_2.safetensors").unlink()
    with open(outputs / "policy_metrics.jsonl", "a") as f:
        f.write('{"run": "2026-12-01 00:00:00", "epoch": 3, "rew')
    result = assert_ok(run_script("train_policy", *policy_args(reward_model, 3, 2), cwd=tmp_path,
                                  checkpoint=tiny_checkpoint))
    assert "completed the interrupted save of epoch 2" in result.stdout
    completed = load_file(outputs / "diffusers_lora_epoch_2.safetensors")
    assert all(torch.equal(completed[k], saved[k]) for k in saved)
    assert "epoch 2: reward" not in result.stdout and "epoch 3: reward" in result.stdout
    assert epochs_in_metrics(tmp_path) == [1, 2, 3]
    assert (outputs / "diffusers_lora_epoch_3.safetensors").is_file()


def test_a_second_train_policy_on_one_outputs_folder_is_refused_at_start(tmp_path, tiny_checkpoint, reward_model):
    with running_stage("train_policy", *policy_args(reward_model, 1000, 1000), cwd=tmp_path,
                       checkpoint=tiny_checkpoint, until="epoch 1: reward") as first:
        second = run_script("train_policy", *policy_args(reward_model, 2, 1), cwd=tmp_path, checkpoint=tiny_checkpoint)
        assert first.poll() is None, "the first run must still be running for this test to mean anything"
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"in use by train_policy (pid {first.pid}" in second.stderr and str(tmp_path / "outputs") in second.stderr
    assert not list((tmp_path / "outputs").glob("*lora_epoch_*"))  # the refused run wrote nothing
