"""Corrupt or truncated files in every place a stage reads, and settings out of range: each is one
sentence (UserError) naming the file or setting and what to do, and nothing already saved changes.
In-process against the function that reads; test_bad_input.py runs a few through the real scripts."""

import json
import os

import pytest
import torch
from helpers import write_red_round
from PIL import Image
from safetensors.torch import load_file, save_file

import generate
import train_reward
from conftest import snapshot
from ddpo.lora import add_lora
from ddpo.reward_model import LatentRewardModel
from utils.cli import parse_settings
from utils.errors import UserError
from utils.files import parse_json
from utils.lora_files import load_lora_into_pipeline, load_lora_into_unet, save_lora
from utils.metrics import append_jsonl, plot_curves, read_jsonl
from utils.pipeline import load_pipeline
from utils.ratings import read_scores
from utils.reward_files import load_reward_model, reward_model_metadata, save_reward_model
from utils.samples import latent_file, load_latent, save_latent

SEEDS = [1, 2, 3, 4, 5, 6]
NESTED = "[" * 100000 + "]" * 100000


def one_sentence(error, *words):
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert str(word) in message, f"{word!r} not in {message!r}"
    return message


def garbage(good):
    return os.urandom(len(good))


def truncated(good):
    return good[: len(good) // 2]


def empty(good):
    return b""


BREAKS = [garbage, truncated, empty]


# ---------------------------------------------------------------- samples: latents, PNGs, scores.json

@pytest.fixture
def rated(tmp_path):
    """A rated round (PNGs, 8x8 latents, scores.json) and train_reward's settings for it."""
    samples = tmp_path / "samples"
    write_red_round(samples, SEEDS, 40, {seed: seed - 3 for seed in SEEDS})
    settings = parse_settings([f"--sample_path={samples}", f"--model_path={tmp_path / 'models'}", "--device=cpu",
                               "--train_reward_num_epochs=1", "--train_reward_batch_size=2"],
                              train_reward.USED_SETTINGS)
    return samples, settings


@pytest.mark.parametrize("break_file", BREAKS)
def test_a_broken_latent_names_its_file(rated, break_file):
    samples, settings = rated
    path = latent_file(str(samples), "3.png")
    with open(path, "rb") as f:
        good = f.read()
    with open(path, "wb") as f:
        f.write(break_file(good))
    with pytest.raises(UserError) as refusal:
        train_reward.load_ratings(settings, "cpu")
    one_sentence(refusal, path, "move it away")


@pytest.mark.parametrize("tensors", [{"latent": torch.zeros(16)}, {"latent": torch.zeros(3, 8, 8)},
                                     {"latent": torch.zeros(4, 0, 8)}, {"other": torch.zeros(4, 8, 8)},
                                     {"latent": torch.full((4, 8, 8), float("nan"))}])
def test_a_latent_of_the_wrong_shape_or_key_names_its_file(tmp_path, tensors):
    path = str(tmp_path / "1.safetensors")
    save_file(tensors, path)
    with pytest.raises(UserError) as refusal:
        load_latent(path)
    one_sentence(refusal, path)


def test_latents_too_small_for_the_reward_model_are_refused(tmp_path):
    samples = tmp_path / "samples"
    for seed in SEEDS:
        save_latent(latent_file(str(samples), f"{seed}.png"), torch.zeros(4, 7, 7))
    (samples / "scores.json").write_text(json.dumps({f"{seed}.png": 1 for seed in SEEDS}))
    settings = parse_settings([f"--sample_path={samples}", "--device=cpu"], train_reward.USED_SETTINGS)
    with pytest.raises(UserError) as refusal:
        train_reward.load_ratings(settings, "cpu")
    one_sentence(refusal, "7x7", "8x8")


@pytest.mark.parametrize("break_file", BREAKS)
def test_a_broken_png_without_a_latent_names_its_file(rated, break_file, tiny_checkpoint):
    samples, settings = rated
    settings.checkpoint_path = tiny_checkpoint
    os.remove(latent_file(str(samples), "4.png"))
    good = (samples / "4.png").read_bytes()
    (samples / "4.png").write_bytes(break_file(good))
    with pytest.raises(UserError) as refusal:
        train_reward.load_ratings(settings, "cpu")
    one_sentence(refusal, samples / "4.png", "no saved latent")


def test_ratings_naming_files_outside_the_round_are_skipped(rated, tmp_path, capsys):
    samples, settings = rated
    outside = tmp_path / "outside"
    outside.mkdir()
    save_latent(latent_file(str(outside), "9.png"), torch.ones(4, 8, 8))
    Image.new("RGB", (64, 64)).save(outside / "9.png")
    os.symlink(outside / "9.png", samples / "7.png")  # a link out of the round
    os.symlink(latent_file(str(outside), "9.png"), latent_file(str(samples), "7.png"))
    scores = json.loads((samples / "scores.json").read_text())
    scores.update({"../outside/9.png": 5, str(outside / "9.png"): 5, "latents/1.png": 5, "7.png": 5, "..": 5})
    (samples / "scores.json").write_text(json.dumps(scores))
    _, ratings = train_reward.load_ratings(settings, "cpu")
    assert len(ratings.scores) == len(SEEDS) and not (ratings.scores == 5).any()
    out = capsys.readouterr().out
    assert "skipped 4 entries" in out and "name no file of its round" in out
    assert "skipped 1 rated entries whose image is not in their round's folder" in out


def test_deeply_nested_json_is_a_sentence_not_a_recursion_error(rated):
    samples, settings = rated
    (samples / "scores.json").write_text(NESTED)
    with pytest.raises(UserError) as refusal:
        read_scores(str(samples / "scores.json"))
    one_sentence(refusal, samples / "scores.json", "nested too deeply")
    with pytest.raises(ValueError):
        parse_json(NESTED)


def test_a_split_that_leaves_nothing_to_train_on_is_refused(rated):
    samples, settings = rated
    settings.train_reward_test_split_ratio = 0.9
    before = snapshot(samples)
    with pytest.raises(UserError) as refusal:
        train_reward.main(settings)
    one_sentence(refusal, "train_reward_test_split_ratio=0.9", f"all {len(SEEDS)} ratings")
    assert snapshot(samples) == before and not os.path.exists(settings.reward_model_path)


def test_a_diverged_reward_model_is_not_saved(rated):
    samples, settings = rated
    settings.train_reward_learning_rate = 1e30
    settings.train_reward_test_split_ratio = 0.0
    with pytest.raises(UserError) as refusal:
        train_reward.main(settings)
    one_sentence(refusal, "NaN or infinite", "train_reward_learning_rate=1e+30", settings.reward_model_path)
    assert not os.path.exists(settings.reward_model_path)


# ---------------------------------------------------------------- the reward model

@pytest.fixture
def reward_model(tmp_path):
    path = str(tmp_path / "reward_model.safetensors")
    save_reward_model(LatentRewardModel(), path, {"epoch": 1, "latent_shape": [4, 8, 8]})
    return path


@pytest.mark.parametrize("make", [
    garbage, truncated, empty,
    lambda good: b"PK\x03\x04" + good[4:],  # the zip a torch.save writes starts so
])
def test_a_broken_reward_model_names_its_file(reward_model, make):
    with open(reward_model, "rb") as f:
        good = f.read()
    with open(reward_model, "wb") as f:
        f.write(make(good))
    for read in (load_reward_model, reward_model_metadata):
        with pytest.raises(UserError) as refusal:
            read(reward_model)
        one_sentence(refusal, reward_model, "train_reward.py")


@pytest.mark.parametrize("state", [
    {"weight": torch.zeros(3)},  # another model's keys
    {k: torch.zeros(v.shape[::-1]) for k, v in LatentRewardModel().state_dict().items()},  # wrong shapes
    {k: torch.full_like(v, float("nan")) for k, v in LatentRewardModel().state_dict().items()},
])
def test_a_reward_model_with_other_weights_names_its_file(reward_model, state):
    save_file({k: v.contiguous() for k, v in state.items()}, reward_model)
    with pytest.raises(UserError) as refusal:
        load_reward_model(reward_model)
    one_sentence(refusal, reward_model, "train_reward.py")


def test_a_pickled_reward_model_is_refused_not_unpickled(reward_model):
    torch.save(LatentRewardModel().state_dict(), reward_model)
    with pytest.raises(UserError) as refusal:
        load_reward_model(reward_model)
    one_sentence(refusal, reward_model, "not a safetensors file")


# ---------------------------------------------------------------- LoRAs: to generate with, to resume

@pytest.fixture(scope="module")
def loras(tiny_checkpoint, tmp_path_factory):
    """{kind: path}: a good rank-4 LoRA and the ways one can be wrong."""
    folder = tmp_path_factory.mktemp("loras")
    for rank, epoch in ((4, 1), (8, 2)):
        pipeline = load_pipeline(tiny_checkpoint, "cpu", torch.float32)
        add_lora(pipeline.unet, rank)
        save_lora(pipeline.unet, str(folder), epoch)
    good = folder / "diffusers_lora_epoch_1.safetensors"
    paths = {"good": good, "rank 8": folder / "diffusers_lora_epoch_2.safetensors"}
    for name, make in (("garbage", garbage), ("truncated", truncated), ("empty", empty)):
        paths[name] = folder / f"{name}.safetensors"
        paths[name].write_bytes(make(good.read_bytes()))
    paths["reward model"] = folder / "reward_model.safetensors"
    save_reward_model(LatentRewardModel(), str(paths["reward model"]), {})
    wider = {k: torch.cat([v, v], dim=-1) if "lora_A" in k else v for k, v in load_file(good).items()}
    paths["another UNet"] = folder / "wider.safetensors"
    save_file(wider, paths["another UNet"])
    return paths


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "reward model", "another UNet"])
def test_a_lora_to_generate_with_that_is_not_one_names_its_file(tiny_checkpoint, loras, kind):
    pipeline = load_pipeline(tiny_checkpoint, "cpu", torch.float32)
    with pytest.raises(UserError) as refusal:
        load_lora_into_pipeline(pipeline, str(loras[kind]))
    one_sentence(refusal, loras[kind])


def test_a_lora_of_another_rank_generates(tiny_checkpoint, loras):
    pipeline = load_pipeline(tiny_checkpoint, "cpu", torch.float32)
    load_lora_into_pipeline(pipeline, str(loras["rank 8"]))
    assert pipeline.unet.peft_config  # loaded, at its own rank


@pytest.mark.parametrize("kind, words", [("garbage", []), ("truncated", []), ("empty", []),
                                         ("reward model", ["holds no UNet LoRA"]), ("another UNet", []),
                                         ("rank 8", ["rank [8]", "lora_rank is 4"])])
def test_a_lora_to_resume_that_does_not_fit_names_its_file(tiny_checkpoint, loras, kind, words):
    pipeline = load_pipeline(tiny_checkpoint, "cpu", torch.float32)
    add_lora(pipeline.unet, 4)
    with pytest.raises(UserError) as refusal:
        load_lora_into_unet(pipeline.unet, str(loras[kind]))
    one_sentence(refusal, loras[kind], *words)


def test_a_good_lora_resumes(tiny_checkpoint, loras):
    pipeline = load_pipeline(tiny_checkpoint, "cpu", torch.float32)
    add_lora(pipeline.unet, 4)
    load_lora_into_unet(pipeline.unet, str(loras["good"]))


# ---------------------------------------------------------------- round.json

@pytest.mark.parametrize("content", ['{"parameters": {}, "seeds": [1, 2', "\xff", "[1, 2]", '{"seeds": [1]}',
                                     '{"parameters": {}, "seeds": ["1"]}', '{"parameters": {}, "seeds": [-1]}',
                                     '{"parameters": [], "seeds": []}', NESTED, ""])
def test_a_broken_round_json_names_the_file_and_changes_nothing(tmp_path, content):
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "round.json").write_bytes(content.encode("latin-1"))
    Image.new("RGB", (8, 8)).save(samples / "5.png")
    before = snapshot(samples)
    settings = parse_settings([f"--sample_path={samples}", "--device=cpu"], generate.USED_SETTINGS)
    with pytest.raises(UserError) as refusal:
        generate.plan_round(settings, {"prompt": "x"})
    one_sentence(refusal, samples / "round.json", "move it away")
    assert snapshot(samples) == before


# ---------------------------------------------------------------- metrics JSON lines

def test_a_metrics_file_cut_short_by_a_kill_reads_and_appends_on(tmp_path, capsys):
    path = str(tmp_path / "policy_metrics.jsonl")
    append_jsonl(path, {"run": "a", "epoch": 1, "loss": 0.5})
    with open(path, "a") as f:
        f.write('{"run": "a", "epoch": 2, "lo')  # a kill in the middle of a write
    assert read_jsonl(path) == [{"run": "a", "epoch": 1, "loss": 0.5}]
    append_jsonl(path, {"run": "b", "epoch": 2, "loss": 0.25})
    assert read_jsonl(path) == [{"run": "a", "epoch": 1, "loss": 0.5}, {"run": "b", "epoch": 2, "loss": 0.25}]
    assert "line 2" in capsys.readouterr().out


def test_lines_that_are_not_records_are_skipped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "reward_metrics.jsonl"
    path.write_bytes(b'{"epoch": 1, "train_loss": 2.0}\nnot json\n[1, 2]\n\xff\xfe\n\n{"epoch": 2, "train_loss": "x"}\n'
                     b'{"train_loss": 1.0}\n{"epoch": 3, "train_loss": 1.5}\n')
    records = read_jsonl(str(path))
    assert [r.get("epoch") for r in records] == [1, 2, None, 3]
    assert capsys.readouterr().out.count("warning: skipped line") == 3
    plot_curves(str(tmp_path / "curves.png"), records, "epoch", [("loss", ["train_loss"])], "hand-edited")
    assert (tmp_path / "curves.png").is_file()


def test_a_scores_json_that_cannot_be_read_is_a_sentence(rated):
    samples, settings = rated
    os.remove(samples / "scores.json")
    (samples / "scores.json").mkdir()
    with pytest.raises(UserError) as refusal:
        read_scores(str(samples / "scores.json"))
    one_sentence(refusal, samples / "scores.json")
    assert (samples / "scores.json").is_dir()
