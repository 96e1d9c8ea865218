"""Nothing a person keeps is moved or deleted: generate archives only what its round owns, folder layouts in
which one stage's folder lies in another's are refused in one sentence, a rerun of the demo removes only what
the demo made, and a history/ on another file system (a link to another drive) is archived to by copying,
checking and only then removing, still whole after a kill at any point."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
from helpers import write_red_round
from PIL import Image

import demo
import generate
from conftest import REPO, run_script, snapshot
from utils.cli import SettingsError, parse_settings
from utils.samples import archive_round, finish_interrupted_archive, history_rounds

SEEDS = [21, 22, 23]


def rated_round(samples, score_name="scores.json"):
    """A rated round as generate and score leave it; returns its snapshot."""
    write_red_round(samples, SEEDS, 9, {seed: seed - 22 for seed in SEEDS}, score_name, round_json=True)
    (samples / "comparisons.json").write_text(json.dumps([{"a": "21.png", "b": "22.png", "winner": "a"}]))
    (samples / "rating_order.json").write_text("[]")
    return snapshot(samples)


def persons_files(samples):
    """What a person keeps in the samples folder besides the round; returns its snapshot."""
    (samples / "notes.txt").write_text("seed 22 is the best so far")
    (samples / "favourites").mkdir()
    Image.new("RGB", (8, 8)).save(samples / "favourites" / "22.png")
    Image.new("RGB", (8, 8)).save(samples / "wallpaper.png")
    return {path: entry for path, entry in snapshot(samples).items()
            if path.split(os.sep)[0] in ("notes.txt", "favourites", "wallpaper.png")}


def one_sentence(error, *words):
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert str(word) in message, f"{word!r} not in {message!r}"


# ---------------------------------------------------------------- archiving takes only the round's files

def test_a_new_round_moves_the_rated_round_and_leaves_a_persons_files(tmp_path):
    samples = tmp_path / "samples"
    round_files = rated_round(samples, "my_scores.json")
    theirs = persons_files(samples)
    settings = parse_settings([f"--sample_path={samples}", f"--score_path={samples / 'my_scores.json'}",
                               "--device=cpu", "--generate_sample_size=2"], generate.USED_SETTINGS)
    generate.plan_round(settings, {"prompt": "new"})
    assert snapshot(samples / "history" / "round_001") == round_files  # the custom-named ratings went with it
    after = snapshot(samples)
    assert {path: entry for path, entry in after.items() if path in theirs} == theirs
    assert sorted(os.listdir(samples)) == ["favourites", "history", "notes.txt", "round.json", "wallpaper.png"]


def test_temp_files_a_kill_left_go_with_their_round(tmp_path):
    samples = tmp_path / "samples"
    rated_round(samples)
    (samples / "24.png.tmp").write_bytes(b"half an image")  # writing()'s, killed
    (samples / ".scores.json.k3j_x9.tmp").write_text("{")  # write_json_atomic's, killed
    archive_round(str(samples))
    assert sorted(os.listdir(samples)) == ["history"]


@pytest.mark.parametrize("arguments, names", [
    (["--lora_path={samples}/outputs/"], ["sample_path", "lora_path"]),
    (["--model_path={samples}/models/"], ["sample_path", "model_path"]),
    (["--model_path={folder}/", "--sample_path={folder}/models/samples/",
      "--score_path={folder}/models/samples/scores.json",
      "--comparison_path={folder}/models/samples/comparisons.json"], ["sample_path", "model_path"]),
    (["--lora_path={folder}/models/"], ["model_path", "lora_path"]),
    (["--lora_path={folder}/samples"], ["sample_path", "lora_path"]),  # the same folder, written without its /
    (["--checkpoint_path={samples}/checkpoint"], ["checkpoint_path", "sample_path"]),
    (["--checkpoint_path={folder}/outputs/base.safetensors"], ["checkpoint_path", "lora_path"]),
    (["--checkpoint_path={folder}/models/"], ["checkpoint_path", "model_path"]),  # models/ inside the checkpoint
    (["--comparison_path={folder}/comparisons.json"], ["comparison_path", "sample_path"]),
    (["--comparison_path={samples}/scores.json"], ["score_path", "comparison_path"]),
    (["--score_path={samples}/round.json"], ["score_path", "round.json"]),
    (["--comparison_path={samples}/7.png"], ["comparison_path", "<seed>.png"]),
])
def test_a_layout_that_nests_one_stages_folder_in_anothers_is_one_sentence(tmp_path, arguments, names):
    folder, samples = tmp_path, tmp_path / "samples"
    paths = [f"--sample_path={samples}/", f"--score_path={samples}/scores.json",
             f"--comparison_path={samples}/comparisons.json", f"--model_path={folder}/models/",
             f"--lora_path={folder}/outputs/", f"--checkpoint_path={folder}/models/checkpoint"]
    with pytest.raises(SettingsError) as refusal:
        parse_settings([*paths, "--device=cpu", *(a.format(folder=folder, samples=samples) for a in arguments)])
    one_sentence(refusal, *names)


def test_the_default_layout_and_a_checkpoint_in_model_path_pass(tmp_path):
    parse_settings(["--device=cpu"])
    parse_settings(["--device=cpu", f"--model_path={tmp_path}/models", f"--checkpoint_path={tmp_path}/models/sd.ckpt"])


@pytest.mark.stages
def test_generate_refuses_a_lora_path_inside_the_samples_folder_and_touches_nothing(tmp_path, tiny_checkpoint):
    samples = tmp_path / "samples"
    rated_round(samples)
    (samples / "outputs").mkdir()
    (samples / "outputs" / "diffusers_lora_epoch_10.safetensors").write_bytes(b"a person's LoRA")
    before = snapshot(tmp_path)
    result = run_script("generate", f"--lora_path={samples / 'outputs'}", "--generate_lora=none", cwd=tmp_path,
                        checkpoint=tiny_checkpoint)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "sample_path" in result.stderr and "lora_path" in result.stderr
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- the demo's rerun

def test_a_demo_rerun_removes_what_the_demo_made_and_nothing_a_person_added(tmp_path):
    folder = tmp_path / "demo"
    record_made = demo.prepare_folder(str(folder))
    rated_round(folder / "samples")  # what the demo's stages write, recorded as it records them
    (folder / "outputs").mkdir()
    (folder / "outputs" / "diffusers_lora_epoch_5.safetensors").write_bytes(b"the demo's LoRA")
    (folder / "summary.json").write_text("{}")
    record_made()
    (folder / "my_notes.txt").write_text("the demo LoRA at epoch 5 looked best")
    (folder / "outputs" / "keep_this_lora.safetensors").write_bytes(b"copied aside by a person")
    (folder / "samples" / "21_edited.png").write_bytes(b"a person's edit")
    theirs = {path: entry for path, entry in snapshot(folder).items()
              if path in ("my_notes.txt", "outputs/keep_this_lora.safetensors", "samples/21_edited.png")}
    demo.prepare_folder(str(folder))
    after = snapshot(folder)
    assert {path: entry for path, entry in after.items() if path != demo.MARKER} == theirs


def test_a_hand_edited_demo_marker_cannot_remove_anything_outside_the_folder(tmp_path):
    folder, outside = tmp_path / "demo", tmp_path / "precious.txt"
    outside.write_text("mine")
    demo.prepare_folder(str(folder))
    (folder / demo.MARKER).write_text(json.dumps({"made": ["../precious.txt", str(outside), "."]}))
    demo.prepare_folder(str(folder))
    assert outside.read_text() == "mine" and folder.is_dir()


# ---------------------------------------------------------------- history/ on another file system

def cross_device_renames(monkeypatch, samples):
    """os.rename and os.replace fail with EXDEV for moves into history/, as with history/ on another drive."""
    history = str(samples / "history")
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def move(source, target, real=real):
            if str(target).startswith(history) and not str(source).startswith(history):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), source, target)
            return real(source, target)

        monkeypatch.setattr(os, name, move)


def test_an_archive_to_another_file_system_copies_checks_and_then_removes(tmp_path, monkeypatch):
    samples = tmp_path / "samples"
    round_files = rated_round(samples)
    theirs = persons_files(samples)
    cross_device_renames(monkeypatch, samples)
    moved = archive_round(str(samples))
    assert snapshot(moved) == round_files and history_rounds(str(samples)) == [moved]
    assert {path: entry for path, entry in snapshot(samples).items() if not path.startswith("history")} == theirs


def other_file_system(tmp_path):
    """A folder on another file system than tmp_path (tmpfs /dev/shm), or None where there is none."""
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        return None
    import tempfile
    return tempfile.mkdtemp(dir=shm, prefix="almostperfect-history-")


@pytest.fixture
def history_elsewhere(tmp_path):
    """samples/history as a link to a folder on another drive (a real one: EXDEV from the kernel)."""
    elsewhere = other_file_system(tmp_path)
    if elsewhere is None:
        pytest.skip("no second file system (/dev/shm) to put history/ on")
    samples = tmp_path / "samples"
    samples.mkdir()
    os.symlink(elsewhere, samples / "history")
    yield samples
    import shutil
    shutil.rmtree(elsewhere)


@pytest.mark.parametrize("crash_at", ["archive_round.copied_one", "archive_round.moved_one"])
def test_an_archive_to_another_drive_killed_midway_is_finished_whole(history_elsewhere, crash_at):
    samples = history_elsewhere
    round_files = {path: entry for path, entry in rated_round(samples).items() if not path.startswith("history")}
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from utils.samples import archive_round; "
              "archive_round(sys.argv[1])")
    killed = subprocess.run([sys.executable, "-c", script, str(samples)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "ALMOSTPERFECT_CRASH_AT": crash_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # every file is whole in one place at least: still in the samples folder, or in the partial round
    partial = next((samples / "history").iterdir())
    here, moved = snapshot(samples), snapshot(partial)
    for path, (size, _, digest) in round_files.items():
        copies = [entry for entry in (here.get(path), moved.get(path)) if entry]
        assert any((entry[0], entry[2]) == (size, digest) for entry in copies), path
    finish_interrupted_archive(str(samples))
    assert sorted(os.listdir(samples)) == ["history"]
    assert snapshot(samples / "history" / "round_001") == round_files


def test_an_archive_across_drives_never_overwrites_what_the_round_already_holds(tmp_path, monkeypatch):
    samples = tmp_path / "samples"
    rated_round(samples)
    partial = samples / "history" / ".round_001.partial"
    partial.mkdir(parents=True)
    (partial / "round.json").mkdir()  # a folder where the file goes
    (partial / "scores.json").write_text("{}")  # another file of that name
    cross_device_renames(monkeypatch, samples)
    finish_interrupted_archive(str(samples))
    archived = samples / "history" / "round_001"
    assert (archived / "round.json").is_dir() and (archived / "scores.json").read_text() == "{}"
    for name in ("round.json", "scores.json"):  # the round's own, kept beside
        assert len(list(archived.glob(f"{name}.conflict-*"))) == 1, name
    assert sorted(os.listdir(samples)) == ["history"]
