"""An SDXL checkpoint FILE (one .safetensors in the original sgm layout, as sd_xl_base_1.0.safetensors and
the SDXL fine-tunes WebUI and ComfyUI use) as checkpoint_path, offline, nothing converted by the user:
the tiny SDXL checkpoint written as one file (tests/ldm_checkpoint.py) is checked key by key against
diffusers' conversion, loads to the folder's weights, and runs generate (the folder's pixels, seed for
seed) -> train_reward -> train_policy. A file of SDXL base's real size and layout (zeros, written sparse)
is recognised and loads with the configs and tokenizers that come with the project.
"""

import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from ldm_checkpoint import OPEN_CLIP_PREFIX, pipeline_to_ldm, write_single_file, write_zeros_file
from PIL import Image
from test_checkpoint_file import DEAD_HUB, SEEDS, planned_round
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from conftest import assert_ok, assert_same_image, run_script, run_scripts
from tools.scripted_rater import rate_by_latent_channel
from utils.checkpoint import CONFIGS, clip_tokenizers, file_family, load_checkpoint, sha256_of_file
from utils.errors import UserError
from utils.pipeline import load_pipeline
from utils.samples import latent_family, latent_file, parse_webui_parameters, read_png_parameters, round_images

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
POLICY = ["--train_policy_num_epochs=1", "--train_save_freq=1", "--train_sample_batch_size=2",
          "--train_sample_num_batches_per_epoch=1", "--train_policy_batch_size=2", "--train_preview_seeds=0,1"]
# SDXL base 1.0's published parameter counts (UNet, VAE, CLIP ViT-L, OpenCLIP ViT-bigG with projection)
SDXL_PARAMETERS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
# tensors of sd_xl_base_1.0.safetensors, with their shapes, that each part of the layout must produce
SDXL_BASE_TENSORS = {
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),  # pooled text (1280) + 6 size ids x 256
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),  # upsampler after the attention
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
}
# tensors sd_xl_base_1.0.safetensors also holds that no diffusers model reads (WebUI and ComfyUI skip them too)
SDXL_BASE_UNREAD = {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
                    "conditioner.embedders.1.model.logit_scale": ()}


@pytest.fixture(scope="module")
def sdxl_pipeline(tiny_sdxl_checkpoint):
    return load_pipeline(tiny_sdxl_checkpoint, "cpu", torch.float32)


@pytest.fixture(scope="module")
def sdxl_file(sdxl_pipeline, tmp_path_factory):
    """The tiny SDXL checkpoint as one sgm-layout file, named as a user's download would be."""
    return write_single_file(sdxl_pipeline, tmp_path_factory.mktemp("sdxl_file") / "tiny-sdxl.safetensors")


def diffusers_conversion(ldm, pipeline):
    """{component: diffusers state dict} as diffusers' single-file loader converts the file's tensors."""
    return {"unet": convert_ldm_unet_checkpoint(ldm, pipeline.unet.config),
            "vae": convert_ldm_vae_checkpoint(ldm, pipeline.vae.config),
            "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ldm).items()},
            "text_encoder_2": convert_open_clip_checkpoint(pipeline.text_encoder_2, ldm, prefix=OPEN_CLIP_PREFIX)}


def in_proj_count(ldm):
    """OpenCLIP's stacked q, k, v tensors: each is three tensors in diffusers' layout."""
    return sum(".attn.in_proj_" in key for key in ldm)


# ---------------------------------------------------------------- the file format, in-process


def test_our_sdxl_layout_converts_back_through_diffusers_key_by_key(sdxl_pipeline):
    ldm = pipeline_to_ldm(sdxl_pipeline)
    converted = diffusers_conversion(ldm, sdxl_pipeline)
    for name, state in converted.items():
        original = getattr(sdxl_pipeline, name).state_dict()
        assert state.keys() == original.keys(), name
        for key, tensor in original.items():
            assert torch.equal(state[key].reshape(tensor.shape), tensor) and state[key].numel() == tensor.numel(), key
    assert in_proj_count(ldm) == 2 * 2  # two layers' weight and bias
    assert sum(len(s) for s in converted.values()) == len(ldm) + 2 * in_proj_count(ldm)  # every file key used once
    assert ldm["conditioner.embedders.1.model.text_projection"].shape == (32, 24)  # (hidden, projection): transposed


def test_the_sdxl_file_loads_to_the_folders_weights_and_a_ckpt_too(sdxl_pipeline, sdxl_file, tiny_sdxl_checkpoint,
                                                                   tmp_path):
    ckpt = tmp_path / "tiny-sdxl.ckpt"
    torch.save({"state_dict": pipeline_to_ldm(sdxl_pipeline)}, ckpt)
    for path in (sdxl_file, str(ckpt)):
        assert file_family(path) == "sdxl"
        loaded = load_pipeline(path, "cpu", torch.float32, checkpoint_config=tiny_sdxl_checkpoint)
        assert isinstance(loaded, StableDiffusionXLPipeline)
        for name in COMPONENTS:
            ours, theirs = getattr(sdxl_pipeline, name).state_dict(), getattr(loaded, name).state_dict()
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), (path, name)
        for name in ("tokenizer", "tokenizer_2"):
            assert getattr(loaded, name).get_vocab() == getattr(sdxl_pipeline, name).get_vocab()
        assert loaded.scheduler.config == sdxl_pipeline.scheduler.config


def test_without_checkpoint_config_the_sdxl_file_is_loaded_with_the_shipped_sdxl_configs(sdxl_file):
    with pytest.raises(UserError) as refused:  # the tiny widths are not SDXL's
        load_checkpoint(sdxl_file, torch.float32)
    assert f"{sdxl_file} does not fit the SDXL configs in {CONFIGS / 'sdxl'}" in str(refused.value)


def real_sdxl_base():
    """SDXL base's architecture from the configs that come with the project, on the meta device (no weights)."""
    configs = CONFIGS / "sdxl"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(configs / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(configs / "vae")))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(configs / "text_encoder")))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(configs / "text_encoder_2")))
    scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(str(configs / "scheduler")))
    return StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     scheduler=scheduler, **clip_tokenizers("sdxl"))


def public(config):
    return {key: value for key, value in config.items() if not key.startswith("_")}


def test_a_file_of_sdxl_bases_size_and_layout_loads_with_the_shipped_configs_and_tokenizers(tmp_path):
    """What a user's sd_xl_base_1.0.safetensors goes through with checkpoint_config = "", weights aside."""
    architecture = real_sdxl_base()
    ldm = pipeline_to_ldm(architecture)  # meta tensors: names and shapes only
    assert {key: tuple(ldm[key].shape) for key in SDXL_BASE_TENSORS} == SDXL_BASE_TENSORS
    assert infer_diffusers_model_type(ldm) == "xl_base"  # diffusers' own detection, on the real depth
    converted = diffusers_conversion(ldm, architecture)
    for name, state in converted.items():
        expected = {k: v.shape for k, v in getattr(architecture, name).state_dict().items()}
        assert {k: v.shape for k, v in state.items()} == expected, name
    shapes = {**{key: tuple(tensor.shape) for key, tensor in ldm.items()}, **SDXL_BASE_UNREAD}
    path = write_zeros_file(shapes, tmp_path / "sd_xl_base.safetensors")
    assert os.path.getsize(path) > 6.9e9  # SDXL base's fp16 size, written as a hole

    loaded = load_checkpoint(path, torch.float16)
    assert isinstance(loaded, StableDiffusionXLPipeline)
    for name, count in SDXL_PARAMETERS.items():
        parameters = list(getattr(loaded, name).parameters())
        assert sum(p.numel() for p in parameters) == count, name
        assert all(not p.is_meta and p.dtype == torch.float16 for p in parameters), name  # every weight from the file
    for name in ("unet", "vae"):
        assert public(getattr(loaded, name).config) == public(getattr(architecture, name).config), name
    shipped = clip_tokenizers("sdxl")
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(loaded, name).get_vocab() == shipped[name].get_vocab()
    assert (loaded.tokenizer.pad_token, loaded.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert isinstance(loaded.scheduler, EulerDiscreteScheduler) and loaded.scheduler.config.timestep_spacing == "leading"


# ---------------------------------------------------------------- the stages, from the file


@pytest.fixture(scope="module")
def sdxl_runs(tmp_path_factory, tiny_sdxl_checkpoint, sdxl_file):
    """generate from the folder and from the file (same seeds, side by side); then train_reward on scripted
    ratings of the file's round and train_policy from the file."""
    by_folder, by_file = tmp_path_factory.mktemp("sdxl_by_folder"), tmp_path_factory.mktemp("sdxl_by_file")
    config = f"--checkpoint_config={tiny_sdxl_checkpoint}"
    planned_round(by_folder, tiny_sdxl_checkpoint)
    planned_round(by_file, sdxl_file, config)
    size = f"--generate_sample_size={len(SEEDS)}"
    folder_run, file_run = run_scripts([
        ("generate", [size], {"cwd": by_folder, "checkpoint": tiny_sdxl_checkpoint, "env": {"HF_HUB_OFFLINE": "1"}}),
        ("generate", [size, config], {"cwd": by_file, "checkpoint": sdxl_file, "env": {"HF_HUB_OFFLINE": "1"}})])
    assert_ok(folder_run), assert_ok(file_run)
    rate_by_latent_channel(str(by_file / "samples"), channel=0)
    reward = assert_ok(run_script("train_reward", "--train_reward_num_epochs=2", "--train_reward_batch_size=4",
                                  "--train_reward_test_split_ratio=0", config, cwd=by_file, checkpoint=sdxl_file,
                                  env={"HF_HUB_OFFLINE": "1"}))
    policy = assert_ok(run_script("train_policy", *POLICY, config, cwd=by_file, checkpoint=sdxl_file, env=DEAD_HUB))
    return by_folder, by_file, reward, policy


def test_generate_from_the_sdxl_file_and_from_the_folder_gives_the_same_images(sdxl_runs, sdxl_file):
    by_folder, by_file, _, _ = sdxl_runs
    names = round_images(by_file / "samples")
    assert names == round_images(by_folder / "samples") == sorted(f"{s}.png" for s in SEEDS)
    for name in names:
        with Image.open(by_file / "samples" / name) as image:
            assert image.size == (64, 64), name
        assert_same_image(by_file / "samples", by_folder / "samples", name)
        settings = parse_webui_parameters(read_png_parameters(by_file / "samples" / name))["settings"]
        assert settings["Model"] == "tiny-sdxl" and settings["Model hash"] == sha256_of_file(sdxl_file)[:10]
        assert latent_family(latent_file(str(by_file / "samples"), name)) == "sdxl"
    assert len({np.asarray(Image.open(by_file / "samples" / n)).tobytes() for n in names}) == len(names)


def test_train_reward_and_train_policy_run_from_the_sdxl_file(sdxl_runs):
    _, by_file, reward, policy = sdxl_runs
    assert "SDXL latents (4, 8, 8)" in reward.stdout
    assert (by_file / "models" / "reward_model.safetensors").is_file()
    assert "epoch 1: reward" in policy.stdout
    outputs = set(os.listdir(by_file / "outputs"))
    assert {"diffusers_lora_epoch_1.safetensors", "ui_lora_epoch_1.safetensors", "preview_epoch_1.png"} <= outputs


def test_an_sdxl_file_with_a_config_of_the_other_family_is_one_sentence(sdxl_file, tiny_checkpoint):
    with pytest.raises(UserError, match="holds a StableDiffusionPipeline, but the checkpoint is SDXL"):
        load_checkpoint(sdxl_file, torch.float32, tiny_checkpoint)
