"""A WebUI/ComfyUI checkpoint FILE as checkpoint_path, offline: the tiny checkpoint written as one ldm-layout
.safetensors (tests/ldm_checkpoint.py), checked key by key against diffusers' conversion, then run through
generate -> train_reward (VAE-encoding an image without a saved latent) -> train_policy as a user would.
Files of another family, truncated files and non-checkpoints are one sentence each, with nothing written.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from ldm_checkpoint import pipeline_to_ldm, write_sd2_like_file, write_single_file
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from test_bad_input import assert_refused
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import generate
from conftest import TINY_SETTINGS, assert_ok, assert_same_image, run_script, run_scripts, snapshot, stage_paths
from ddpo.lora import add_lora
from tools.scripted_rater import rate_by_latent_channel
from tools.tiny_checkpoint import tiny_unet
from utils.checkpoint import CONFIGS, clip_tokenizers, file_family, load_checkpoint, model_identity, sha256_of_file
from utils.cli import parse_settings
from utils.errors import UserError
from utils.lora_files import latest_lora, save_lora, saved_loras, ui_lora_name
from utils.pipeline import load_pipeline
from utils.samples import latent_file, parse_webui_parameters, read_png_parameters, round_images

SEEDS = [11, 22, 33, 44, 55, 66]
DEAD_HUB = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # any attempt to reach a hub fails at once
POLICY = ["--train_save_freq=1", "--train_sample_batch_size=2", "--train_sample_num_batches_per_epoch=1",
          "--train_policy_batch_size=2", "--train_preview_seeds=0,1", "--lora_name_prefix=fox_"]


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, "cpu", torch.float32)


@pytest.fixture(scope="module")
def tiny_file(tiny_pipeline, tmp_path_factory):
    """The tiny checkpoint as one ldm-layout file, named as a user's download would be."""
    return write_single_file(tiny_pipeline, tmp_path_factory.mktemp("file") / "tiny-sd15.safetensors")


# ---------------------------------------------------------------- the file format, in-process


def test_our_ldm_layout_converts_back_through_diffusers_key_by_key(tiny_pipeline):
    ldm = pipeline_to_ldm(tiny_pipeline)
    converted = {"unet": convert_ldm_unet_checkpoint(ldm, tiny_pipeline.unet.config),
                 "vae": convert_ldm_vae_checkpoint(ldm, tiny_pipeline.vae.config),
                 "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ldm).items()}}
    for name, state in converted.items():
        original = getattr(tiny_pipeline, name).state_dict()
        assert state.keys() == original.keys(), name
        for key, tensor in original.items():
            assert torch.equal(state[key].reshape(tensor.shape), tensor) and state[key].numel() == tensor.numel(), key
    assert sum(len(s) for s in converted.values()) == len(ldm)  # every key of the file is used, once


def test_the_file_loads_to_the_same_weights_and_a_ckpt_too(tiny_pipeline, tiny_file, tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": pipeline_to_ldm(tiny_pipeline)}, ckpt)  # the layout of WebUI-era .ckpt files
    for path in (tiny_file, str(ckpt)):
        loaded = load_checkpoint(path, torch.float32, tiny_checkpoint)
        for name in ("unet", "vae", "text_encoder"):
            ours, theirs = getattr(tiny_pipeline, name).state_dict(), getattr(loaded, name).state_dict()
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), (path, name)
        assert loaded.tokenizer.get_vocab() == tiny_pipeline.tokenizer.get_vocab()


def test_the_shipped_tokenizer_gives_clips_ids():
    tokenizers = clip_tokenizers("sdxl")
    assert tokenizers["tokenizer"]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizers["tokenizer"]) == 49408 and tokenizers["tokenizer"].model_max_length == 77
    assert tokenizers["tokenizer"].pad_token_id == 49407  # SD1.5 pads with <|endoftext|>
    assert tokenizers["tokenizer_2"].pad_token_id == 0  # SDXL's second tokenizer pads with "!"


def test_the_shipped_configs_are_sd15s_and_sdxls_architectures():
    def parameters(model):
        return sum(p.numel() for p in model.parameters())

    def text_encoder(folder, cls=CLIPTextModel):
        with torch.device("meta"):
            return cls(CLIPTextConfig.from_pretrained(str(folder)))

    with torch.device("meta"):
        sd15_unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIGS / "sd15" / "unet")))
        sdxl_unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIGS / "sdxl" / "unet")))
    assert parameters(sd15_unet) == 859_520_964  # SD1.5's published counts
    assert parameters(text_encoder(CONFIGS / "sd15" / "text_encoder")) == 123_060_480
    assert parameters(sdxl_unet) == 2_567_463_684
    assert parameters(text_encoder(CONFIGS / "sdxl" / "text_encoder_2", CLIPTextModelWithProjection)) == 694_659_840


def write_keys(path, shapes):
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
    return str(path)


UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
# Distinguishing keys (and shapes) of families that are not loaded, as diffusers' own detection reads them
OTHER_FILES = {
    "SD2.x": ({}, ["SD2.x", "not supported"]),
    "SDXL refiner": ({UNET_KEY: (8, 4, 3, 3), "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (8,)},
                     ["SDXL refiner"]),
    "inpainting": ({UNET_KEY: (8, 9, 3, 3), "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8)},
                   ["inpainting", "9 input channels"]),
    "LoRA": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, ["a LoRA", "not a Stable Diffusion checkpoint"]),
    "VAE": ({"decoder.conv_out.weight": (3, 8, 3, 3), "encoder.conv_in.weight": (8, 3, 3, 3)}, ["a VAE"]),
    "no VAE": ({UNET_KEY: (8, 4, 3, 3), "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (8, 16, 1, 1),
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8)},
               ["SD1.x UNet but no VAE", "first_stage_model."]),
}


@pytest.mark.parametrize("case", OTHER_FILES)
def test_a_file_of_another_family_or_kind_is_one_sentence_naming_it(case, tmp_path):
    shapes, words = OTHER_FILES[case]
    path = write_sd2_like_file(tmp_path / "m.safetensors") if case == "SD2.x" else write_keys(tmp_path / "m.safetensors", shapes)
    with pytest.raises(UserError) as refused:
        load_checkpoint(path, torch.float32)
    for word in [path, *words]:
        assert word in str(refused.value)


def test_a_pickle_that_holds_code_and_an_unknown_extension_are_refused(tmp_path):
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {UNET_KEY: torch.zeros(1)}, "callbacks": {"when": np.datetime64("2022-01-01")}}, pickled)
    with pytest.raises(UserError, match="pickled checkpoint .* not loaded; get the .safetensors release"):
        load_checkpoint(str(pickled), torch.float32)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="neither a diffusers folder nor a .safetensors or .ckpt"):
        load_checkpoint(str(tmp_path / "model.gguf"), torch.float32)


@pytest.mark.parametrize("remove, words", [("unet", ["its unet/ folder"]), ("tokenizer/tokenizer.json", ["tokenizer/tokenizer.json"]),
                                           ("vae/diffusion_pytorch_model.safetensors", ["the weights in vae/"])])
def test_a_folder_missing_a_component_names_it(remove, words, tiny_checkpoint, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError) as refused:
        load_checkpoint(str(folder), torch.float32)
    for word in [str(folder), *words]:
        assert word in str(refused.value)


def test_a_checkpoint_config_of_another_family_is_refused(tiny_file, tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(UserError, match="holds a StableDiffusionXLPipeline, but the checkpoint is SD1.x"):
        load_checkpoint(tiny_file, torch.float32, str(tmp_path))
    with pytest.raises(UserError, match="does not fit the SD1.x configs"):  # the tiny weights in SD1.5's shapes
        load_checkpoint(tiny_file, torch.float32)


def test_model_identity_is_webuis_name_and_short_hash(tiny_file, tiny_checkpoint):
    assert model_identity(tiny_file) == ("tiny-sd15", sha256_of_file(tiny_file)[:10])
    assert model_identity(tiny_checkpoint + "/") == (os.path.basename(tiny_checkpoint), None)


# ---------------------------------------------------------------- the stages, from the file


def planned_round(folder, checkpoint, *args):
    """round.json with SEEDS for generate's settings in `folder`, so that two runs make the same images."""
    command_line = {**stage_paths(folder, checkpoint), **TINY_SETTINGS}  # as run_script passes them
    settings = parse_settings([f"--{k}={v}" for k, v in command_line.items()] + list(args), generate.USED_SETTINGS)
    (folder / "samples").mkdir(parents=True)
    (folder / "samples" / "round.json").write_text(
        json.dumps({"parameters": generate.round_parameters(settings, None), "seeds": SEEDS}))


REFUSED_FILES = {"SD2.x file": (write_sd2_like_file, ["SD2.x", "not supported"]),
                 "truncated file": (None, ["truncated"]),
                 "not a checkpoint": (None, ["cannot be read as a .safetensors file"])}


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory, tiny_checkpoint, tiny_file):
    """generate from the folder and from the file (same seeds, side by side), and the refused files."""
    by_folder, by_file = tmp_path_factory.mktemp("by_folder"), tmp_path_factory.mktemp("by_file")
    file_settings = [f"--checkpoint_config={tiny_checkpoint}"]
    planned_round(by_folder, tiny_checkpoint)
    planned_round(by_file, tiny_file, *file_settings)
    calls = [("generate", [f"--generate_sample_size={len(SEEDS)}"], {"cwd": by_folder, "checkpoint": tiny_checkpoint,
                                                                     "env": {"HF_HUB_OFFLINE": "1"}}),
             ("generate", [f"--generate_sample_size={len(SEEDS)}", *file_settings],
              {"cwd": by_file, "checkpoint": tiny_file, "env": DEAD_HUB})]
    refused = {}
    data = open(tiny_file, "rb").read()
    for case in REFUSED_FILES:
        folder = tmp_path_factory.mktemp("refused")
        path = folder / "model.safetensors"
        if case == "SD2.x file":
            write_sd2_like_file(path)
        else:
            path.write_bytes(data[: len(data) // 2] if case == "truncated file" else b"<html>Not Found</html>" * 40)
        refused[case] = (folder, str(path), snapshot(folder))
        calls.append(("generate", ["--generate_sample_size=2"], {"cwd": folder, "checkpoint": str(path)}))
    results = run_scripts(calls)
    return by_folder, by_file, results[0], results[1], {
        case: (str(path), result, before, snapshot(folder))
        for (case, (folder, path, before)), result in zip(refused.items(), results[2:])}


@pytest.mark.parametrize("case", REFUSED_FILES)
def test_a_refused_file_is_one_sentence_and_nothing_is_written(first_runs, case):
    path, result, before, after = first_runs[4][case]
    assert_refused(result, path, *REFUSED_FILES[case][1])
    assert after == before


def test_generate_from_the_file_and_from_the_folder_gives_the_same_images(first_runs, tiny_file, tiny_checkpoint):
    by_folder, by_file, folder_run, file_run, _ = first_runs
    assert_ok(folder_run), assert_ok(file_run)
    names = round_images(by_file / "samples")
    assert names == round_images(by_folder / "samples") == sorted(f"{s}.png" for s in SEEDS)
    for name in names:
        assert_same_image(by_file / "samples", by_folder / "samples", name)
        from_file = parse_webui_parameters(read_png_parameters(by_file / "samples" / name))["settings"]
        from_folder = parse_webui_parameters(read_png_parameters(by_folder / "samples" / name))["settings"]
        assert from_file["Model"] == "tiny-sd15" and from_file["Model hash"] == sha256_of_file(tiny_file)[:10]
        assert from_folder["Model"] == os.path.basename(tiny_checkpoint) and "Model hash" not in from_folder
    with Image.open(by_file / "samples" / names[0]) as image:
        line = image.info["parameters"].splitlines()[-1]
    assert line.index("Size:") < line.index("Model hash:") < line.index("Model:")  # WebUI's order


@pytest.fixture(scope="module")
def trained_from_the_file(first_runs, tiny_file, tiny_checkpoint):
    """train_reward (one image's latent removed: it is VAE-encoded through the file) and train_policy, from the file."""
    _, folder, _, _, _ = first_runs
    samples = folder / "samples"
    rate_by_latent_channel(str(samples), channel=0)
    os.remove(latent_file(str(samples), f"{SEEDS[0]}.png"))
    config = f"--checkpoint_config={tiny_checkpoint}"
    reward = assert_ok(run_script("train_reward", "--train_reward_num_epochs=2", "--train_reward_batch_size=4",
                                  "--train_reward_test_split_ratio=0", config, cwd=folder, checkpoint=tiny_file,
                                  env={"HF_HUB_OFFLINE": "1"}))
    policy = assert_ok(run_script("train_policy", "--train_policy_num_epochs=1", *POLICY, config, cwd=folder,
                                  checkpoint=tiny_file, env=DEAD_HUB))
    return folder, reward, policy


def test_train_reward_encodes_an_image_through_the_file_and_train_policy_trains_from_it(trained_from_the_file):
    folder, reward, policy = trained_from_the_file
    assert "VAE-encoding 1 images that have no saved latent" in reward.stdout
    assert (folder / "models" / "reward_model.safetensors").is_file()
    assert "epoch 1: reward" in policy.stdout
    outputs = folder / "outputs"
    assert {"fox_diffusers_lora_epoch_1.safetensors", "fox_ui_lora_epoch_1.safetensors", "fox_ui_lora_epoch_1.preview.png",
            "fox_optimizer_epoch_1.pt", "fox_preview_epoch_1.png"} <= set(os.listdir(outputs))
    assert not any(name.startswith(("diffusers_lora", "ui_lora", "optimizer")) for name in os.listdir(outputs))


def test_the_ui_lora_carries_kohyas_metadata_and_a_preview_card(trained_from_the_file, tiny_file):
    folder, _, _ = trained_from_the_file
    with safe_open(str(folder / "outputs" / "fox_ui_lora_epoch_1.safetensors"), "pt") as f:
        metadata = f.metadata()
        assert len(list(f.keys())) == 384
    expected = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0",
                "ss_base_model_version": "sd_v1", "ss_output_name": "fox_ui_lora_epoch_1", "ss_epoch": "1",
                "ss_sd_model_name": "tiny-sd15.safetensors", "ss_resolution": "(64, 64)",
                "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
                "modelspec.implementation": "diffusers", "modelspec.title": "fox_ui_lora_epoch_1",
                "modelspec.resolution": "64x64", "modelspec.prediction_type": "epsilon",
                "almostperfect.prompt": "a neon sign", "almostperfect.epoch": "1",
                "almostperfect.reward_model": "reward_model.safetensors",
                "almostperfect.reward_model_sha256": sha256_of_file(folder / "models" / "reward_model.safetensors"),
                "almostperfect.checkpoint": "tiny-sd15",
                "almostperfect.checkpoint_hash": sha256_of_file(tiny_file)[:10]}
    assert {k: metadata.get(k) for k in expected} == expected
    assert metadata["modelspec.date"][:4].isdigit() and "T" in metadata["modelspec.date"]
    with Image.open(folder / "outputs" / "fox_ui_lora_epoch_1.preview.png") as card:
        assert card.format == "PNG" and card.size == (64, 64)  # one image of the LoRA, not the grid


def test_resume_and_generates_latest_find_the_prefixed_files(trained_from_the_file, tiny_file, tiny_checkpoint):
    folder, _, _ = trained_from_the_file
    settings = parse_settings([f"--lora_path={folder / 'outputs'}", "--lora_name_prefix=fox_"], generate.USED_SETTINGS)
    assert generate.resolve_lora(settings) == str(folder / "outputs" / "fox_diffusers_lora_epoch_1.safetensors")
    settings = parse_settings([f"--lora_path={folder / 'outputs'}"], generate.USED_SETTINGS)
    assert generate.resolve_lora(settings) is None  # another prefix's (here: none) LoRAs are not this run's
    resumed = assert_ok(run_script("train_policy", "--train_policy_num_epochs=2", *POLICY,
                                   f"--checkpoint_config={tiny_checkpoint}", cwd=folder, checkpoint=tiny_file))
    assert f"resuming after epoch 1 from {folder / 'outputs' / 'fox_resume_state.pt'}" in resumed.stdout
    assert (folder / "outputs" / "fox_ui_lora_epoch_2.safetensors").is_file()


def test_two_prefixes_in_one_folder_do_not_collide_and_each_finds_its_own(tmp_path):
    unet = tiny_unet()
    add_lora(unet, 4)
    for prefix in ("", "fox_"):
        for epoch in (1, 2):
            save_lora(unet, str(tmp_path), epoch, prefix)
    assert sorted(os.listdir(tmp_path)) == sorted(f"{prefix}{kind}_lora_epoch_{epoch}.safetensors"
                                                  for prefix in ("", "fox_") for kind in ("diffusers", "ui")
                                                  for epoch in (1, 2))
    assert saved_loras(str(tmp_path)) == {e: str(tmp_path / f"diffusers_lora_epoch_{e}.safetensors") for e in (1, 2)}
    assert latest_lora(str(tmp_path), "fox_") == (2, str(tmp_path / "fox_diffusers_lora_epoch_2.safetensors"))
    assert latest_lora(str(tmp_path), "fo") == (0, None)
    assert ui_lora_name(latest_lora(str(tmp_path), "fox_")[1]) == "fox_ui_lora_epoch_2"
    assert ui_lora_name("/elsewhere/my_style.safetensors") == "my_style"  # a LoRA given by path keeps its name


def test_sdxl_base_keys_are_recognised_as_sdxl(tmp_path):
    path = write_keys(tmp_path / "sdxl.safetensors", {
        UNET_KEY: (8, 4, 3, 3), "first_stage_model.decoder.conv_out.weight": (3, 8, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (8,),
        "conditioner.embedders.1.model.positional_embedding": (77, 8)})
    assert file_family(path) == "sdxl"
