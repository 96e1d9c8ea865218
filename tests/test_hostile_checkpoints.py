"""Checkpoints as a hostile tester or a clumsy user gives them (issue 20): each broken file is one sentence
that names it and says what to do, from the one reader of checkpoints (utils/checkpoint.py), and a stage
given one writes nothing; a file of any case (.SAFETENSORS, .CKPT), a ~ in a path setting and a diffusers
folder of pickled .bin weights load; the same path holding another model starts a new round; a model whose
weights are NaN stops generate at its first non-finite latent, before any image of the batch is written.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from ldm_checkpoint import OPEN_CLIP_PREFIX, pipeline_to_ldm
from safetensors.torch import load_file, save_file
from test_bad_input import assert_refused

import config
import generate
from conftest import TINY_SETTINGS, run_scripts, snapshot, stage_paths
from utils.checkpoint import load_checkpoint, model_identity
from utils.cli import parse_settings
from utils.errors import UserError
from utils.pipeline import decode_latents, load_pipeline
from utils.samples import LATENTS, ROUND_FILE, history_rounds, round_images

UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
UNET_QUERY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
TEXT_QUERY = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
HTML = "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n" * 4


@pytest.fixture(scope="module")
def ldm(tiny_checkpoint):
    """The tiny SD1.5 checkpoint's tensors, as one file holds them."""
    return pipeline_to_ldm(load_pipeline(tiny_checkpoint, "cpu", torch.float32))


@pytest.fixture(scope="module")
def sdxl_ldm(tiny_sdxl_checkpoint):
    return pipeline_to_ldm(load_pipeline(tiny_sdxl_checkpoint, "cpu", torch.float32))


def changed(state, **tensors):
    """A copy of the {name: tensor} `state` with these tensors replaced (None: removed)."""
    copy = {**state, **tensors}
    return {name: tensor.contiguous() for name, tensor in copy.items() if tensor is not None}


def broken_files(folder, ldm, sdxl_ldm):
    """{case: (path, config folder kind, words its sentence holds)}: files as they reach users broken."""
    cases = {}

    def case(name, file_name, content, words, family="sd15"):
        path = folder / name.replace(" ", "_") / file_name
        path.parent.mkdir(parents=True)
        if isinstance(content, dict):
            save_file(content, str(path))
        else:
            path.write_bytes(content)
        cases[name] = (str(path), family, words)

    case("empty file", "model.safetensors", b"", ["empty file (0 bytes", "download or copy the model again"])
    case("empty ckpt", "model.ckpt", b"", ["empty file (0 bytes", "download or copy the model again"])
    case("HTML page as ckpt", "model.ckpt", HTML.encode(), ["not a checkpoint but an HTML page", "download"])
    case("Git LFS pointer", "model.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n",
         ["not a checkpoint but a Git LFS pointer", "git lfs pull"])
    query = ldm[UNET_QUERY]
    case("tensor of the wrong rank", "model.safetensors", changed(ldm, **{UNET_QUERY: query.flatten()}),
         [f"shape [{query.numel()}]", f"need {list(query.shape)}", "download it again"])
    case("tensor of the wrong shape", "model.safetensors",
         changed(ldm, **{UNET_INPUT: torch.zeros(ldm[UNET_INPUT].shape[0], 3, 3, 3)}),
         ["a tensor of shape [8, 3, 3, 3] for conv_in.weight", "need [8, 4, 3, 3]", "download it again"])
    case("wrong rank where the family is read", "model.safetensors",
         changed(ldm, **{UNET_INPUT: ldm[UNET_INPUT].flatten()}),
         ["a tensor of the wrong rank", "download it again"])
    case("missing text-encoder tensor", "model.safetensors", changed(ldm, **{TEXT_QUERY: None}),
         ["lacks 1 tensor(s) of its text_encoder", "q_proj.weight", "download the full checkpoint again"])
    case("SDXL file without its text projection", "model.safetensors",
         changed(sdxl_ldm, **{OPEN_CLIP_PREFIX + "text_projection": None}),
         ["lacks 1 tensor(s) of its text_encoder_2", "text_projection", "download the full checkpoint again"], "sdxl")
    return cases


@pytest.fixture(scope="module")
def broken(tmp_path_factory, ldm, sdxl_ldm):
    return broken_files(tmp_path_factory.mktemp("broken"), ldm, sdxl_ldm)


CASES = ["empty file", "empty ckpt", "HTML page as ckpt", "Git LFS pointer", "tensor of the wrong rank",
         "tensor of the wrong shape", "wrong rank where the family is read", "missing text-encoder tensor",
         "SDXL file without its text projection"]


@pytest.mark.parametrize("case", CASES)
def test_a_broken_checkpoint_file_is_one_sentence_naming_it(broken, case, tiny_checkpoint, tiny_sdxl_checkpoint):
    path, family, words = broken[case]
    with pytest.raises(UserError) as refused:
        load_checkpoint(path, torch.float32, tiny_checkpoint if family == "sd15" else tiny_sdxl_checkpoint)
    sentence = str(refused.value)
    assert "\n" not in sentence and sentence.startswith(path)
    for word in words:
        assert word in sentence, f"{word!r} not in {sentence!r}"
    assert "as code" not in sentence  # only a pickle that holds objects is said to hold code


@pytest.mark.stages
def test_stages_given_broken_files_write_nothing(broken, tmp_path_factory, tiny_checkpoint, tiny_sdxl_checkpoint):
    cases = ["HTML page as ckpt", "SDXL file without its text projection", "tensor of the wrong shape"]
    folders = {case: tmp_path_factory.mktemp("stage") for case in cases}
    before = {case: snapshot(folder) for case, folder in folders.items()}
    calls = [("generate", ["--generate_sample_size=2", "--checkpoint_config="
                           + (tiny_sdxl_checkpoint if broken[case][1] == "sdxl" else tiny_checkpoint)],
              {"cwd": folders[case], "checkpoint": broken[case][0]}) for case in cases]
    for case, result in zip(cases, run_scripts(calls)):
        assert_refused(result, broken[case][0], *broken[case][2])
        assert snapshot(folders[case]) == before[case], case


# ---------------------------------------------------------------- what loads


def assert_same_weights(pipeline, loaded):
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipeline, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_upper_case_suffixes_load(ldm, tiny_checkpoint, tmp_path):
    save_file(ldm, str(tmp_path / "TINY.SAFETENSORS"))
    torch.save({"state_dict": ldm}, tmp_path / "Tiny.Ckpt")
    pipeline = load_pipeline(tiny_checkpoint, "cpu", torch.float32)
    for name in ("TINY.SAFETENSORS", "Tiny.Ckpt"):
        assert_same_weights(pipeline, load_checkpoint(str(tmp_path / name), torch.float32, tiny_checkpoint))
    assert model_identity(str(tmp_path / "TINY.SAFETENSORS"))[0] == "TINY"


def test_a_tilde_in_any_path_setting_is_the_home_folder(ldm, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    save_file(ldm, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(config, "lora_path", "~/outputs/")  # config.py's values as well as the command line's
    settings = parse_settings(["--checkpoint_path=~/model.safetensors", f"--checkpoint_config={tiny_checkpoint}",
                               "--sample_path=~/samples/", "--model_path=~/models/",
                               "--generate_lora=~/my.safetensors"])
    assert settings.checkpoint_path == str(tmp_path / "model.safetensors")
    assert (settings.sample_path, settings.score_path) == (str(tmp_path / "samples") + "/",
                                                           str(tmp_path / "samples" / "scores.json"))
    assert settings.reward_model_path == str(tmp_path / "models" / "reward_model.safetensors")
    assert settings.lora_path == str(tmp_path / "outputs") + "/"
    assert settings.generate_lora == str(tmp_path / "my.safetensors")
    load_checkpoint(settings.checkpoint_path, torch.float32, settings.checkpoint_config)


def test_a_diffusers_folder_of_pickled_bin_weights_loads_and_one_holding_objects_is_refused(tiny_checkpoint, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    for component, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                            ("text_encoder", "model")):
        weights = folder / component / f"{name}.safetensors"
        bin_name = "pytorch_model.bin" if name == "model" else f"{name}.bin"  # transformers' and diffusers' names
        torch.save(load_file(str(weights)), folder / component / bin_name)
        weights.unlink()
    pipeline = load_pipeline(tiny_checkpoint, "cpu", torch.float32)
    assert_same_weights(pipeline, load_checkpoint(str(folder), torch.float32))
    unet_bin = folder / "unet" / "diffusion_pytorch_model.bin"
    torch.save({"conv_in.weight": torch.zeros(1), "when": np.datetime64("2022-01-01")}, unet_bin)
    with pytest.raises(UserError) as refused:
        load_checkpoint(str(folder), torch.float32)
    sentence = str(refused.value)
    assert sentence.startswith(f"{folder} has weights that cannot be loaded") and str(unet_bin) in sentence


# ---------------------------------------------------------------- generate: another model at the same path, NaN weights


def generate_settings(folder, checkpoint, tiny_checkpoint, *args):
    command_line = {**stage_paths(folder, checkpoint), **TINY_SETTINGS, "checkpoint_config": tiny_checkpoint,
                    "generate_lora": "none"}
    return parse_settings([f"--{k}={v}" for k, v in command_line.items()] + list(args))


def test_another_model_saved_at_the_same_path_starts_a_new_round(ldm, tiny_checkpoint, tmp_path, monkeypatch):
    checkpoint = tmp_path / "models" / "model.safetensors"
    checkpoint.parent.mkdir()
    save_file(ldm, str(checkpoint))
    settings = generate_settings(tmp_path, checkpoint, tiny_checkpoint, "--generate_sample_size=3")
    (tmp_path / "samples").mkdir()
    hashed = []
    sha256 = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: hashed.append(1) or sha256(*a))
    generate.plan_round(settings, generate.round_parameters(settings, None))
    seeds = json.loads((tmp_path / "samples" / ROUND_FILE).read_text())["seeds"]
    generate.plan_round(settings, generate.round_parameters(settings, None))
    model_identity(settings.checkpoint_path)  # the PNGs' Model hash
    assert json.loads((tmp_path / "samples" / ROUND_FILE).read_text())["seeds"] == seeds  # the same model resumes
    assert len(hashed) == 1, "the checkpoint file is hashed once per process"
    other = tmp_path / "other.safetensors"
    save_file(changed(ldm, **{UNET_INPUT: ldm[UNET_INPUT] + 1}), str(other))
    os.replace(other, checkpoint)  # a new download saved over the old one
    generate.plan_round(settings, generate.round_parameters(settings, None))
    assert [os.path.basename(r) for r in history_rounds(str(tmp_path / "samples"))] == ["round_001"]
    assert json.loads((tmp_path / "samples" / "history" / "round_001" / ROUND_FILE).read_text())["seeds"] == seeds


def test_nan_weights_stop_generate_at_the_first_latent_before_any_image_is_written(ldm, tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "nan.safetensors"
    save_file(changed(ldm, **{UNET_QUERY: torch.full_like(ldm[UNET_QUERY], float("nan"))}), str(checkpoint))
    settings = generate_settings(tmp_path, checkpoint, tiny_checkpoint, "--generate_sample_size=4",
                                 "--generate_batch_size=2")
    with pytest.raises(UserError) as refused:
        generate.main(settings)
    sentence = str(refused.value)
    assert "became NaN or infinite at DDIM step 1" in sentence and str(checkpoint) in sentence
    assert "no image of this batch was written" in sentence and "\n" not in sentence
    samples = tmp_path / "samples"
    assert round_images(str(samples)) == []
    assert not (samples / LATENTS).exists() or not os.listdir(samples / LATENTS)


def test_a_vae_that_decodes_to_nan_is_a_sentence(tiny_checkpoint):
    pipeline = load_pipeline(tiny_checkpoint, "cpu", torch.float32)
    with torch.no_grad():
        pipeline.vae.decoder.conv_out.weight.fill_(float("nan"))
    with pytest.raises(UserError, match="VAE decodes latents to NaN or infinite pixels"):
        decode_latents(pipeline, torch.zeros(1, 4, 8, 8))


def test_a_round_recorded_before_checkpoint_hashes_resumes_and_gains_the_hash(ldm, tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    save_file(ldm, str(checkpoint))
    settings = generate_settings(tmp_path, checkpoint, tiny_checkpoint, "--generate_sample_size=3")
    parameters = generate.round_parameters(settings, None)
    (tmp_path / "samples").mkdir()
    recorded = {"parameters": {k: v for k, v in parameters.items() if k != "checkpoint_hash"}, "seeds": [1, 2]}
    (tmp_path / "samples" / ROUND_FILE).write_text(json.dumps(recorded))
    generate.plan_round(settings, parameters)
    current = json.loads((tmp_path / "samples" / ROUND_FILE).read_text())
    assert current["seeds"][:2] == [1, 2] and len(current["seeds"]) == 3 and current["parameters"] == parameters
    assert history_rounds(str(tmp_path / "samples")) == []
