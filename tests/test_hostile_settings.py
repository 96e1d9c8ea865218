"""Settings and small files made hostile: a prompt that is not UTF-8, wrong-typed values in config.py itself,
lock files with impossible pids or on a full disk, a latent or reward model of an unknown model family,
errors about temp files, two train_reward runs on one models/ folder. Each gives one sentence naming
config.py, the setting or the user's file (never a temp file), or the right result."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import write_red_round
from safetensors.torch import save_file

import config
import generate
import train_reward
from conftest import run_script, snapshot, stage_command
from ddpo.reward_model import LatentRewardModel
from utils.cli import SettingsError, defaults, parse_settings, run_stage
from utils.errors import UserError
from utils.files import write_json_atomic
from utils.locks import LOCK_NAME, folder_lock
from utils.reward_files import check_family, save_reward_model
from utils.samples import latent_file, save_latent

SEEDS = [1, 2, 3, 4, 5, 6]


def one_sentence(message, *words):
    assert "\n" not in message.strip() and "Traceback" not in message, message
    for word in words:
        assert str(word) in message, f"{word!r} not in {message!r}"
    return message


def stage_refusal(main, used, argv, monkeypatch, capsys):
    """run_stage(main) with the command line `argv`, in this process: (exit code, the one line of stderr)."""
    monkeypatch.setattr(sys, "argv", ["stage.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        run_stage(main, used)
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return exit_.value.code, error


@pytest.fixture
def rated(tmp_path):
    """A rated round and train_reward's settings for it."""
    samples = tmp_path / "samples"
    write_red_round(samples, SEEDS, 40, {seed: seed - 3 for seed in SEEDS})
    arguments = [f"--sample_path={samples}", f"--model_path={tmp_path / 'models'}", "--device=cpu",
                 "--train_reward_num_epochs=1", "--train_reward_batch_size=2", "--train_reward_ensemble_size=1"]
    return samples, arguments, parse_settings(arguments, train_reward.USED_SETTINGS)


# ---------------------------------------------------------------- a prompt that is not UTF-8

@pytest.mark.stages
def test_a_prompt_that_is_not_utf8_on_the_command_line_is_one_sentence(tmp_path, tiny_checkpoint):
    command, env = stage_command("generate", "--generate_sample_size=1", cwd=tmp_path, checkpoint=tiny_checkpoint)
    result = subprocess.run([os.fsencode(part) for part in command] + [b"--prompt=a neon sign \xff\xfe"], cwd=tmp_path,
                            env=env, capture_output=True, timeout=300)
    error = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, error
    one_sentence(error, "prompt", "not valid UTF-8")
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize("name", ["prompt", "negative_prompt", "lora_name_prefix"])
def test_text_that_is_not_utf8_is_refused_from_the_command_line_and_from_config(name, monkeypatch):
    bad = "a neon sign " + b"\xff".decode("utf-8", "surrogateescape")
    with pytest.raises(SettingsError) as refusal:
        parse_settings(["--device=cpu", f"--{name}={bad}"])
    one_sentence(str(refusal.value), name, "UTF-8")
    monkeypatch.setattr(config, name, bad)
    with pytest.raises(SettingsError) as refusal:
        parse_settings(["--device=cpu"])
    one_sentence(str(refusal.value), name, "UTF-8")


# ---------------------------------------------------------------- config.py's own values

@pytest.mark.parametrize("name, value", [
    ("lora_rank", "32"), ("height", 1080.0), ("generate_sample_size", True), ("eta", "1.0"), ("guidance_scale", None),
    ("generate_vae_slicing", "yes"), ("train_compile", 0), ("prompt", 42), ("sample_path", ["samples/"]),
    ("train_gradient_checkpointing", "sometimes"), ("seed", 1.5),
])
def test_a_wrong_typed_value_in_config_py_names_config_py_and_the_setting(name, value, monkeypatch, capsys):
    monkeypatch.setattr(config, name, value)
    with pytest.raises(SettingsError) as refusal:
        parse_settings(["--device=cpu"])
    one_sentence(str(refusal.value), "config.py", name, repr(value))
    code, error = stage_refusal(train_reward.main, train_reward.USED_SETTINGS, ["--device=cpu"], monkeypatch, capsys)
    assert code == 2 and "config.py" in error and name in error


def test_a_setting_deleted_from_config_py_is_named(monkeypatch):
    monkeypatch.delattr(config, "train_clip_range")
    with pytest.raises(SettingsError) as refusal:
        defaults()
    one_sentence(str(refusal.value), "config.py", "train_clip_range")


def test_a_whole_number_where_config_py_wants_a_number_is_fine(monkeypatch):
    monkeypatch.setattr(config, "guidance_scale", 7)
    settings = parse_settings(["--device=cpu"])
    assert settings.guidance_scale == 7.0 and isinstance(settings.guidance_scale, float)


@pytest.mark.parametrize("source, line", [("lora_rank = 32\nheight = 1080 +\n", 2), (b"prompt = '\xff'\n", 1),
                                          ("import torch\nwidth = undefined_name\n", 2)])
def test_a_config_py_that_python_cannot_run_is_one_sentence(tmp_path, monkeypatch, source, line):
    broken = tmp_path / "config.py"
    broken.write_bytes(source if isinstance(source, bytes) else source.encode())
    monkeypatch.delitem(sys.modules, "config")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SettingsError) as refusal:
        parse_settings(["--device=cpu"])
    one_sentence(str(refusal.value), "config.py", f"line {line}")


# ---------------------------------------------------------------- lock files

@pytest.mark.parametrize("pid", [0, -1, 2**40, 10**30, True, "1", 1.0, None, [1]])
def test_a_lock_with_a_pid_no_process_can_have_is_taken_over(tmp_path, pid, capsys):
    import socket
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "stage": "generate",
                                                  "started": "2026-12-01 00:00:00"}))
    with folder_lock(str(tmp_path), "score") as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid() and lock.held
    assert "took over the stale lock" in capsys.readouterr().out
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_that_cannot_be_written_on_a_full_disk_is_named_and_left_nowhere(tmp_path, monkeypatch, capsys):
    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    samples = tmp_path / "samples"
    code, error = stage_refusal(generate.main, generate.USED_SETTINGS, [f"--sample_path={samples}", "--device=cpu"],
                                monkeypatch, capsys)
    assert code == 1 and f"no space left to write {samples / LOCK_NAME}" in error
    assert not (samples / LOCK_NAME).exists()  # no empty lock left to hold the folder


# ---------------------------------------------------------------- model families no one knows

def test_a_latent_of_an_unknown_family_names_its_file(rated):
    samples, _, settings = rated
    path = latent_file(str(samples), "2.png")
    save_file({"latent": torch.zeros(4, 8, 8, dtype=torch.float16)}, path, metadata={"family": "sd3"})
    with pytest.raises(UserError) as refusal:
        train_reward.load_ratings(settings, "cpu")
    one_sentence(str(refusal.value), path, "'sd3'", "move it away")


def test_a_reward_model_of_an_unknown_family_names_its_file(tmp_path):
    path = str(tmp_path / "reward_model.safetensors")
    for family in ("sdxl-turbo", ["sd15"]):
        save_reward_model(LatentRewardModel(), path, {"family": family})
        with pytest.raises(UserError) as refusal:
            check_family(path, "sd15", "this round's latents")
        one_sentence(str(refusal.value), path, "train_reward.py")


# ---------------------------------------------------------------- errors name the user's file, not a temp file

def test_a_reward_model_path_that_is_a_folder_is_named_not_its_temp_file(rated, tmp_path, monkeypatch, capsys):
    _, arguments, settings = rated
    os.makedirs(settings.reward_model_path)  # a folder where the model file goes
    code, error = stage_refusal(train_reward.main, train_reward.USED_SETTINGS, arguments, monkeypatch, capsys)
    assert code == 2 and f"cannot use {settings.reward_model_path} " in error and ".tmp" not in error


@pytest.mark.parametrize("writer", ["latent", "json"])
def test_a_temp_file_in_the_way_is_not_what_the_error_names(tmp_path, writer):
    path = tmp_path / ("1.safetensors" if writer == "latent" else "scores.json")
    if writer == "latent":
        (tmp_path / "1.safetensors.tmp").mkdir()  # writing()'s temp name, taken by a folder
        with pytest.raises(OSError) as failure:
            save_latent(str(path), torch.zeros(4, 8, 8))
    else:
        with pytest.raises(OSError) as failure:  # a folder that is not there: mkstemp fails on a random name
            write_json_atomic(str(tmp_path / "gone" / "scores.json"), {})
        path = tmp_path / "gone" / "scores.json"
    assert failure.value.filename == str(path) and ".tmp" not in str(failure.value)


# ---------------------------------------------------------------- one train_reward per models/ folder

@pytest.mark.stages
def test_a_second_train_reward_on_one_models_folder_is_refused(rated, tmp_path):
    samples, arguments, settings = rated
    models = tmp_path / "models"
    with folder_lock(str(models), "train_reward"):  # a first run, in this process
        before = snapshot(models)
        with pytest.raises(UserError) as refusal:
            train_reward.main(settings)
        one_sentence(str(refusal.value), "in use by train_reward", f"pid {os.getpid()}", models)
        second = run_script("train_reward", *arguments, cwd=tmp_path)
        assert second.returncode == 2, second.stderr
        one_sentence(second.stderr, "in use by train_reward", f"pid {os.getpid()}")
        assert snapshot(models) == before
    train_reward.main(settings)  # the lock released, the next run trains
    assert os.path.isfile(settings.reward_model_path) and not (models / LOCK_NAME).exists()
