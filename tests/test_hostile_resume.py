"""What train_policy resumes from, made hostile: a corrupt or misfitting optimizer file, a resume state with
wrong-typed fields or of another model family, a full disk while saving, a precision switched between runs,
a kill during the first epoch, a lora_name_prefix too long for the file system. Each is one sentence naming
the file or setting, at start (before an epoch is spent), or a correct resume with nothing lost."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import train_policy
from conftest import TINY_SETTINGS, assert_ok, run_script, stage_command
from ddpo.lora import add_lora
from ddpo.precision import INITIAL_LOSS_SCALE, MixedPrecision
from utils.cli import parse_settings, run_stage, stage_paths
from utils.errors import UserError
from utils.pipeline import load_pipeline
from utils.run_state import STATE_FILE, load_run_state, resume_training, save_run_state

pytestmark = pytest.mark.stages  # a trained run in a module fixture: train_policy in a subprocess

POLICY = ["--train_sample_batch_size=2", "--train_sample_num_batches_per_epoch=1", "--train_policy_batch_size=2",
          "--train_policy_learning_rate=1e-2", "--train_preview_seeds="]


def policy_arguments(folder, checkpoint, reward_model, epochs, *extra):
    paths = stage_paths(str(folder), checkpoint)
    return [*(f"--{k}={v}" for k, v in {**paths, **TINY_SETTINGS}.items()), f"--reward_model_path={reward_model}",
            f"--train_policy_num_epochs={epochs}", "--train_save_freq=1", *POLICY, *extra]


def policy_settings(folder, checkpoint, reward_model, epochs, *extra):
    return parse_settings(policy_arguments(folder, checkpoint, reward_model, epochs, *extra),
                          train_policy.USED_SETTINGS)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, tiny_checkpoint, random_reward_model):
    """outputs/ of a finished 1-epoch run (saved: LoRA, optimizer, resume state), made by the real script."""
    folder = tmp_path_factory.mktemp("one_epoch")
    assert_ok(run_script("train_policy", f"--reward_model_path={random_reward_model}", "--train_policy_num_epochs=1",
                         "--train_save_freq=1", *POLICY, cwd=folder, checkpoint=tiny_checkpoint))
    return folder / "outputs"


@pytest.fixture
def resumable(tmp_path, one_epoch, tiny_checkpoint, random_reward_model, monkeypatch):
    """(outputs folder, settings for epoch 2): a copy of one_epoch's run, whose next run must refuse before an epoch."""
    shutil.copytree(one_epoch, tmp_path / "outputs")
    monkeypatch.setattr(train_policy, "run_epoch", lambda *a, **k: pytest.fail("an epoch ran before the refusal"))
    return tmp_path / "outputs", policy_settings(tmp_path, tiny_checkpoint, random_reward_model, 2)


def refused(settings, *words):
    with pytest.raises(UserError) as refusal:
        train_policy.main(settings)
    message = str(refusal.value)
    assert "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert str(word) in message, f"{word!r} not in {message!r}"
    return message


def optimizer_state_of_rank(checkpoint, rank, family_unet=None):
    """(unet, optimizer) of a rank-`rank` LoRA on the tiny UNet after one AdamW step (so it has moments)."""
    unet = family_unet or load_pipeline(checkpoint, "cpu", torch.float32).unet
    parameters = add_lora(unet, rank)
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    for p in parameters:
        p.grad = torch.ones_like(p)
    optimizer.step()
    return unet, optimizer


# ---------------------------------------------------------------- the optimizer file (resume without a state)

@pytest.mark.parametrize("content", [b"", b"garbage" * 100, "truncated"])
def test_a_corrupt_optimizer_file_on_the_fallback_path_names_it(resumable, content):
    outputs, settings = resumable
    (outputs / STATE_FILE).unlink()  # resume from the saved LoRA and its optimizer file
    optimizer_file = outputs / "optimizer_epoch_1.pt"
    good = optimizer_file.read_bytes()
    optimizer_file.write_bytes(good[: len(good) // 2] if content == "truncated" else content)
    refused(settings, optimizer_file, "move it away", "fresh optimizer")


def test_an_optimizer_file_of_another_rank_is_refused_at_start(resumable, tiny_checkpoint):
    outputs, settings = resumable
    (outputs / STATE_FILE).unlink()
    _, optimizer = optimizer_state_of_rank(tiny_checkpoint, 8)
    torch.save(optimizer.state_dict(), outputs / "optimizer_epoch_1.pt")
    refused(settings, outputs / "optimizer_epoch_1.pt", "another rank", "fresh optimizer")


def test_a_resume_state_whose_optimizer_is_of_another_rank_is_refused_at_start(resumable, tiny_checkpoint):
    outputs, settings = resumable
    state = torch.load(outputs / STATE_FILE, weights_only=True)
    state["optimizer"] = optimizer_state_of_rank(tiny_checkpoint, 8)[1].state_dict()
    torch.save(state, outputs / STATE_FILE)
    refused(settings, outputs / STATE_FILE, "another rank")


# ---------------------------------------------------------------- the resume state's fields

def rng_as_floats(state):
    state["rng"]["torch"] = state["rng"]["torch"].float()


@pytest.mark.parametrize("spoil", [
    lambda s: s.update(epoch="1"), lambda s: s.update(epoch=1.0), lambda s: s.update(epoch=True),
    lambda s: s.update(epoch=-1), lambda s: s.update(metrics_lines="1"), lambda s: s.update(metrics_lines=-2),
    lambda s: s.update(lora=[1, 2]), lambda s: s.update(lora={"a": torch.zeros(2, dtype=torch.long)}),
    lambda s: s.update(lora={k: torch.full_like(v, float("nan")) for k, v in s["lora"].items()}),
    lambda s: s.update(optimizer=None), lambda s: s.update(optimizer={"state": [], "param_groups": []}),
    lambda s: s.update(rng={"torch": torch.zeros(3, dtype=torch.uint8), "cuda": []}), rng_as_floats,
    lambda s: s.update(rng={"torch": s["rng"]["torch"], "cuda": "none"}),
    lambda s: s.update(grad_scaler={"loss_scale": "65536", "clean_minibatches": 0}),
    lambda s: s.update(grad_scaler={"loss_scale": float("nan"), "clean_minibatches": 0}),
    lambda s: s.update(grad_scaler={"loss_scale": 2.0, "clean_minibatches": 0.5}),
    lambda s: s.update(family="sd3"), lambda s: s.pop("rng"),
], ids=lambda spoil: "spoil")
def test_a_resume_state_with_a_wrong_typed_field_names_the_file(one_epoch, tmp_path, spoil):
    state = torch.load(one_epoch / STATE_FILE, weights_only=True)
    spoil(state)
    torch.save(state, tmp_path / STATE_FILE)
    with pytest.raises(UserError) as refusal:
        load_run_state(str(tmp_path / STATE_FILE))
    assert str(tmp_path / STATE_FILE) in str(refusal.value) and "move it away" in str(refusal.value)


def test_a_resume_state_that_is_not_a_dict_names_the_file_and_the_stage_stops_at_start(resumable):
    outputs, settings = resumable
    torch.save([1, 2, 3], outputs / STATE_FILE)
    refused(settings, outputs / STATE_FILE, "holds a list")


def test_a_resume_state_of_the_other_family_names_both_families_not_lora_rank(resumable, tiny_sdxl_checkpoint):
    outputs, settings = resumable
    sdxl = load_pipeline(tiny_sdxl_checkpoint, "cpu", torch.float32)
    unet, optimizer = optimizer_state_of_rank(None, 4, sdxl.unet)
    save_run_state(str(outputs / STATE_FILE), 1, unet, optimizer, MixedPrecision.create("no", "cpu"),
                   str(outputs / "policy_metrics.jsonl"), "sdxl")
    message = refused(settings, outputs / STATE_FILE, "SDXL", "SD1.x", "checkpoint_path")
    assert "lora_rank" not in message
    state = torch.load(outputs / STATE_FILE, weights_only=True)
    del state["family"]  # a state saved before the family was: told by its LoRA's keys
    torch.save(state, outputs / STATE_FILE)
    refused(settings, outputs / STATE_FILE, "SDXL", "SD1.x")


def test_a_resume_state_of_another_rank_says_which_rank(resumable):
    _, settings = resumable
    settings.lora_rank = 8
    refused(settings, STATE_FILE, "rank 4", "lora_rank is 8", "--lora_rank=4")


# ---------------------------------------------------------------- a full disk while saving

def test_a_full_disk_while_writing_the_resume_state_is_the_disk_full_sentence(tmp_path, tiny_checkpoint,
                                                                              random_reward_model, monkeypatch,
                                                                              capsys):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    os.symlink("/dev/full", outputs / f"{STATE_FILE}.tmp")  # writing()'s temp file, on a disk with no room
    monkeypatch.setattr(sys, "argv", ["train_policy.py", *policy_arguments(tmp_path, tiny_checkpoint,
                                                                          random_reward_model, 1)])
    with pytest.raises(SystemExit) as exit_:
        run_stage(train_policy.main, train_policy.USED_SETTINGS)
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and len(error.splitlines()) == 1, error
    assert f"no space left to write {outputs / STATE_FILE} " in error and ".tmp" not in error
    assert not (outputs / f"{STATE_FILE}.tmp").exists() and not (outputs / STATE_FILE).exists()


def test_a_full_disk_while_writing_the_optimizer_state_names_it_and_keeps_the_epoch(tmp_path, tiny_checkpoint,
                                                                                 random_reward_model):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    os.symlink("/dev/full", outputs / "optimizer_epoch_1.pt.tmp")
    with pytest.raises(OSError) as full:
        train_policy.main(policy_settings(tmp_path, tiny_checkpoint, random_reward_model, 1))
    assert full.value.errno == 28 and full.value.filename == str(outputs / "optimizer_epoch_1.pt")
    assert torch.load(outputs / STATE_FILE, weights_only=True)["epoch"] == 1  # the epoch itself is kept


# ---------------------------------------------------------------- precision switched between runs

def test_a_loss_scale_is_taken_over_only_from_an_fp16_state(tmp_path, tiny_checkpoint):
    pipeline = load_pipeline(tiny_checkpoint, "cpu", torch.float32)
    add_lora(pipeline.unet, 4)
    optimizer = torch.optim.AdamW([p for p in pipeline.unet.parameters() if p.requires_grad])
    metrics, outputs = str(tmp_path / "policy_metrics.jsonl"), str(tmp_path)
    halved = MixedPrecision.create("fp16", "cpu", loss_scale=256.0)
    for saved_in, expected in (("no", INITIAL_LOSS_SCALE), ("bf16", INITIAL_LOSS_SCALE), ("fp16", 256.0)):
        precision = MixedPrecision.create(saved_in, "cpu") if saved_in != "fp16" else halved
        save_run_state(os.path.join(outputs, STATE_FILE), 1, pipeline.unet, optimizer, precision, metrics, "sd15")
        resumed = MixedPrecision.create("fp16", "cpu")
        resume_training(outputs, "", pipeline.unet, optimizer, resumed, metrics, lambda *a: None, "sd15")
        assert resumed.loss_scale == expected, saved_in
    state = torch.load(os.path.join(outputs, STATE_FILE), weights_only=True)
    state["grad_scaler"] = {"loss_scale": 1.0, "clean_minibatches": 0}  # an fp32 run's, saved before names were
    resumed = MixedPrecision.create("fp16", "cpu")
    resumed.load_state_dict(state["grad_scaler"])
    assert resumed.loss_scale == INITIAL_LOSS_SCALE


# ---------------------------------------------------------------- a kill during the first epoch

@pytest.mark.stages
def test_a_kill_during_the_first_epoch_leaves_one_metrics_line_per_epoch(tmp_path, tiny_checkpoint,
                                                                        random_reward_model):
    crash = {"ALMOSTPERFECT_CRASH_AT": "train_policy.metrics_written"}  # after epoch 1's line, before its state
    command, env = stage_command("train_policy", f"--reward_model_path={random_reward_model}",
                                 "--train_policy_num_epochs=1", "--train_save_freq=1", *POLICY, cwd=tmp_path,
                                 checkpoint=tiny_checkpoint, env=crash)
    killed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    metrics = tmp_path / "outputs" / "policy_metrics.jsonl"
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1]  # written, then killed
    train_policy.main(policy_settings(tmp_path, tiny_checkpoint, random_reward_model, 1))
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1]
    assert (tmp_path / "outputs" / "diffusers_lora_epoch_1.safetensors").is_file()


# ---------------------------------------------------------------- lora_name_prefix and the file system's limit

def test_a_prefix_too_long_for_the_file_system_is_refused_before_an_epoch(tmp_path, tiny_checkpoint,
                                                                         random_reward_model, monkeypatch):
    monkeypatch.setattr(train_policy, "load_models", lambda *a, **k: pytest.fail("models loaded before the refusal"))
    settings = policy_settings(tmp_path, tiny_checkpoint, random_reward_model, 100,
                               f"--lora_name_prefix={'n' * 224}_")
    message = refused(settings, "lora_name_prefix", "_diffusers_lora_epoch_100.safetensors.tmp", "255")
    assert "shorten it by 10 bytes" in message and not (tmp_path / "outputs").exists()
    settings.lora_name_prefix = "n" * 214 + "_"  # the longest that fits: 255 bytes with its temp suffix
    settings.lora_path = str(tmp_path / "other_outputs")
    with pytest.raises(pytest.fail.Exception, match="models loaded"):
        train_policy.main(settings)
