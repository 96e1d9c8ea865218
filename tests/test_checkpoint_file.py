"""A WebUI/ComfyUI checkpoint FILE as checkpoint_path, offline, for SD1.5 and SDXL: the tiny checkpoint written as
one file in the original (ldm / sgm) layout (tests/ldm_checkpoint.py), as v1-5-pruned-emaonly.safetensors,
sd_xl_base_1.0.safetensors and their fine-tunes are, checked key by key against diffusers' conversion, loading
to the folder's weights, then run through generate (the folder's images, seed for seed) -> train_reward
(VAE-encoding an image without a saved latent) -> train_policy as a user would. A file of SDXL base's real
size and layout (zeros, written sparse) loads with the configs and tokenizers that come with the project.
Files of another family, truncated files and non-checkpoints are one sentence each, with nothing written.
"""

import json
import os
import shutil

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
from helpers import DEAD_HUB, PLANNED_SEEDS, planned_round
from ldm_checkpoint import (
    OPEN_CLIP_PREFIX,
    pipeline_to_ldm,
    write_sd2_like_file,
    write_single_file,
    write_zeros_file,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import generate
from conftest import (
    FAMILIES,
    assert_ok,
    assert_refused,
    assert_same_image,
    run_in_process,
    run_script,
    run_scripts,
    snapshot,
)
from ddpo.lora import add_lora
from tools.scripted_rater import rate_by_latent_channel
from tools.tiny_checkpoint import tiny_unet
from utils.checkpoint import CONFIGS, clip_tokenizers, file_family, load_checkpoint, model_identity, sha256_of_file
from utils.cli import parse_settings
from utils.errors import UserError
from utils.lora_files import latest_lora, save_lora, saved_loras, ui_lora_name
from utils.pipeline import load_pipeline
from utils.samples import latent_family, latent_file, parse_webui_parameters, read_png_parameters, round_images

POLICY = ["--train_save_freq=1", "--train_sample_batch_size=2", "--train_sample_num_batches_per_epoch=1",
          "--train_policy_batch_size=2", "--train_preview_seeds=0,1", "--lora_name_prefix=fox_"]
COMPONENTS = {"sd15": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
TOKENIZERS = {"sd15": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}
# the UI LoRA's kohya metadata that differs between the families
LORA_METADATA = {"sd15": {"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora",
                          "modelspec.implementation": "diffusers"},
                 "sdxl": {"ss_base_model_version": "sdxl_base_v1-0",
                          "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                          "modelspec.implementation": "https://github.com/Stability-AI/generative-models"}}
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
def family_pipeline(family_checkpoint):
    return load_pipeline(family_checkpoint, "cpu", torch.float32)


@pytest.fixture(scope="module")
def family_file(family, family_pipeline, tmp_path_factory):
    """The tiny checkpoint as one ldm/sgm-layout file, named as a user's download would be."""
    return write_single_file(family_pipeline, tmp_path_factory.mktemp("file") / f"tiny-{family.name}.safetensors")


def diffusers_conversion(ldm, pipeline):
    """{component: diffusers state dict} as diffusers' single-file loader converts the file's tensors."""
    clip = convert_ldm_clip_checkpoint(ldm)
    converted = {"unet": convert_ldm_unet_checkpoint(ldm, pipeline.unet.config),
                 "vae": convert_ldm_vae_checkpoint(ldm, pipeline.vae.config),
                 "text_encoder": {k.removeprefix("text_model."): v for k, v in clip.items()}}
    if isinstance(pipeline, StableDiffusionXLPipeline):
        converted["text_encoder_2"] = convert_open_clip_checkpoint(pipeline.text_encoder_2, ldm,
                                                                   prefix=OPEN_CLIP_PREFIX)
    return converted


def in_proj_count(ldm):
    """OpenCLIP's stacked q, k, v tensors (SDXL's second text encoder): each is three tensors in diffusers' layout."""
    return sum(".attn.in_proj_" in key for key in ldm)


# ---------------------------------------------------------------- the file format, in-process


def test_our_layout_converts_back_through_diffusers_key_by_key(family, family_pipeline):
    ldm = pipeline_to_ldm(family_pipeline)
    converted = diffusers_conversion(ldm, family_pipeline)
    assert set(converted) == set(COMPONENTS[family.name])
    for name, state in converted.items():
        original = getattr(family_pipeline, name).state_dict()
        assert state.keys() == original.keys(), name
        for key, tensor in original.items():
            assert torch.equal(state[key].reshape(tensor.shape), tensor) and state[key].numel() == tensor.numel(), key
    assert sum(len(s) for s in converted.values()) == len(ldm) + 2 * in_proj_count(ldm)  # every file key used once
    if family.name == "sdxl":
        assert in_proj_count(ldm) == 2 * 2  # two layers' weight and bias
        # stored as (hidden, projection): transposed
        assert ldm["conditioner.embedders.1.model.text_projection"].shape == (32, 24)
    else:
        assert in_proj_count(ldm) == 0


def test_the_file_loads_to_the_same_weights_and_a_ckpt_too(family, family_pipeline, family_file, family_checkpoint,
                                                           tmp_path):
    ckpt = tmp_path / f"tiny-{family.name}.ckpt"
    torch.save({"state_dict": pipeline_to_ldm(family_pipeline)}, ckpt)  # the layout of WebUI-era .ckpt files
    for path in (family_file, str(ckpt)):
        assert file_family(path) == family.name
        loaded = load_pipeline(path, "cpu", torch.float32, checkpoint_config=family_checkpoint)
        assert isinstance(loaded, family.pipeline_class)
        for name in COMPONENTS[family.name]:
            ours, theirs = getattr(family_pipeline, name).state_dict(), getattr(loaded, name).state_dict()
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), (path, name)
        for name in TOKENIZERS[family.name]:
            assert getattr(loaded, name).get_vocab() == getattr(family_pipeline, name).get_vocab()
        assert loaded.scheduler.config == family_pipeline.scheduler.config


def test_without_checkpoint_config_the_file_is_loaded_with_the_shipped_configs(family, family_file):
    with pytest.raises(UserError) as refused:  # the tiny widths are not the real architecture's
        load_checkpoint(family_file, torch.float32)
    assert f"{family_file} does not fit the {family.label} configs in {CONFIGS / family.name}" in str(refused.value)


def test_a_checkpoint_config_of_the_other_family_is_refused(family, family_file, tmp_path):
    other = next(f for f in FAMILIES.values() if f != family)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": other.pipeline_class.__name__}))
    refusal = f"holds a {other.pipeline_class.__name__}, but the checkpoint is {family.label}"
    with pytest.raises(UserError, match=refusal):
        load_checkpoint(family_file, torch.float32, str(tmp_path))


def test_model_identity_is_webuis_name_and_short_hash(family, family_file, family_checkpoint):
    assert model_identity(family_file) == (f"tiny-{family.name}", sha256_of_file(family_file)[:10])
    assert model_identity(family_checkpoint + "/") == (os.path.basename(family_checkpoint), None)


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


@pytest.mark.slow  # a sparse 7 GB file read in-process: a minute and 7 GB of memory
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
    assert isinstance(loaded.scheduler, EulerDiscreteScheduler)
    assert loaded.scheduler.config.timestep_spacing == "leading"


def write_keys(path, shapes):
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
    return str(path)


UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
CLIP_POSITIONS = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
# Distinguishing keys (and shapes) of families that are not loaded, as diffusers' own detection reads them
OTHER_FILES = {
    "SD2.x": ({}, ["SD2.x", "not supported"]),
    "SDXL refiner": ({UNET_KEY: (8, 4, 3, 3),
                      "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (8,)},
                     ["SDXL refiner"]),
    "inpainting": ({UNET_KEY: (8, 9, 3, 3), CLIP_POSITIONS: (77, 8)}, ["inpainting", "9 input channels"]),
    "LoRA": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)},
             ["a LoRA", "not a Stable Diffusion checkpoint"]),
    "VAE": ({"decoder.conv_out.weight": (3, 8, 3, 3), "encoder.conv_in.weight": (8, 3, 3, 3)}, ["a VAE"]),
    "no VAE": ({UNET_KEY: (8, 4, 3, 3), CLIP_POSITIONS: (77, 8),
                "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (8, 16, 1, 1)},
               ["SD1.x UNet but no VAE", "first_stage_model."]),
}


@pytest.mark.parametrize("case", OTHER_FILES)
def test_a_file_of_another_family_or_kind_is_one_sentence_naming_it(case, tmp_path):
    shapes, words = OTHER_FILES[case]
    path = (write_sd2_like_file(tmp_path / "m.safetensors") if case == "SD2.x"
            else write_keys(tmp_path / "m.safetensors", shapes))
    with pytest.raises(UserError) as refused:
        load_checkpoint(path, torch.float32)
    for word in [path, *words]:
        assert word in str(refused.value)


def test_sdxl_base_keys_are_recognised_as_sdxl(tmp_path):
    path = write_keys(tmp_path / "sdxl.safetensors", {
        UNET_KEY: (8, 4, 3, 3), "first_stage_model.decoder.conv_out.weight": (3, 8, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (8,),
        "conditioner.embedders.1.model.positional_embedding": (77, 8)})
    assert file_family(path) == "sdxl"


def test_a_pickle_that_holds_code_and_an_unknown_extension_are_refused(tmp_path):
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {UNET_KEY: torch.zeros(1)}, "callbacks": {"when": np.datetime64("2022-01-01")}}, pickled)
    with pytest.raises(UserError, match="pickled checkpoint .* not loaded; get the .safetensors release"):
        load_checkpoint(str(pickled), torch.float32)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="neither a diffusers folder nor a .safetensors or .ckpt"):
        load_checkpoint(str(tmp_path / "model.gguf"), torch.float32)


@pytest.mark.parametrize("remove, words", [("unet", ["its unet/ folder"]),
                                           ("tokenizer/tokenizer.json", ["tokenizer/tokenizer.json"]),
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


# ---------------------------------------------------------------- generate refuses a file that is no checkpoint


REFUSED_FILES = {"SD2.x file": ["SD2.x", "not supported"], "truncated file": ["truncated"],
                 "not a checkpoint": ["cannot be read as a .safetensors file"]}


@pytest.mark.parametrize("family", ["sd15"], indirect=True)
@pytest.mark.parametrize("case", REFUSED_FILES)
def test_a_refused_file_is_one_sentence_and_nothing_is_written(case, family_file, tmp_path):
    """Through generate's command line in this process: test_bad_input.py holds the contract of the process."""
    path = tmp_path / "model.safetensors"
    if case == "SD2.x file":
        write_sd2_like_file(path)
    else:
        data = open(family_file, "rb").read()
        path.write_bytes(data[: len(data) // 2] if case == "truncated file" else b"<html>Not Found</html>" * 40)
    before = snapshot(tmp_path)
    assert_refused(run_in_process("generate", "--generate_sample_size=2", cwd=tmp_path, checkpoint=str(path)),
                   str(path), *REFUSED_FILES[case])
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- the stages, from the file


@pytest.fixture(scope="module")
def generated(family_checkpoint, family_file, tmp_path_factory):
    """generate from the folder and from the file, the same seeds side by side: (by_folder, by_file)."""
    by_folder, by_file = tmp_path_factory.mktemp("by_folder"), tmp_path_factory.mktemp("by_file")
    file_settings = [f"--checkpoint_config={family_checkpoint}"]
    planned_round(by_folder, family_checkpoint)
    planned_round(by_file, family_file, *file_settings)
    size = f"--generate_sample_size={len(PLANNED_SEEDS)}"
    for result in run_scripts([
            ("generate", [size], {"cwd": by_folder, "checkpoint": family_checkpoint, "env": {"HF_HUB_OFFLINE": "1"}}),
            ("generate", [size, *file_settings], {"cwd": by_file, "checkpoint": family_file, "env": DEAD_HUB})]):
        assert_ok(result)
    return by_folder, by_file


@pytest.mark.stages
def test_generate_from_the_file_and_from_the_folder_gives_the_same_images(family, generated, family_file,
                                                                          family_checkpoint):
    by_folder, by_file = generated
    names = round_images(by_file / "samples")
    assert names == round_images(by_folder / "samples") == sorted(f"{s}.png" for s in PLANNED_SEEDS)
    for name in names:
        with Image.open(by_file / "samples" / name) as image:
            assert image.size == (64, 64), name
        assert_same_image(by_file / "samples", by_folder / "samples", name)
        from_file = parse_webui_parameters(read_png_parameters(by_file / "samples" / name))["settings"]
        from_folder = parse_webui_parameters(read_png_parameters(by_folder / "samples" / name))["settings"]
        assert from_file["Model"] == f"tiny-{family.name}"
        assert from_file["Model hash"] == sha256_of_file(family_file)[:10]
        assert from_folder["Model"] == os.path.basename(family_checkpoint) and "Model hash" not in from_folder
        assert latent_family(latent_file(str(by_file / "samples"), name)) == family.name
    assert len({np.asarray(Image.open(by_file / "samples" / n)).tobytes() for n in names}) == len(names)
    with Image.open(by_file / "samples" / names[0]) as image:
        line = image.info["parameters"].splitlines()[-1]
    assert line.index("Size:") < line.index("Model hash:") < line.index("Model:")  # WebUI's order


@pytest.fixture(scope="module")
def trained_from_the_file(generated, family_file, family_checkpoint):
    """train_reward (one image's latent removed: it is VAE-encoded through the file) and train_policy, from the file."""
    _, folder = generated
    samples = folder / "samples"
    rate_by_latent_channel(str(samples), channel=0)
    os.remove(latent_file(str(samples), f"{PLANNED_SEEDS[0]}.png"))
    config = f"--checkpoint_config={family_checkpoint}"
    reward = assert_ok(run_script("train_reward", "--train_reward_num_epochs=2", "--train_reward_batch_size=4",
                                  "--train_reward_test_split_ratio=0", config, cwd=folder, checkpoint=family_file,
                                  env={"HF_HUB_OFFLINE": "1"}))
    policy = assert_ok(run_script("train_policy", "--train_policy_num_epochs=1", *POLICY, config, cwd=folder,
                                  checkpoint=family_file, env=DEAD_HUB))
    return folder, reward, policy


@pytest.mark.stages
def test_train_reward_encodes_an_image_through_the_file_and_train_policy_trains_from_it(family, trained_from_the_file):
    folder, reward, policy = trained_from_the_file
    assert "VAE-encoding 1 images that have no saved latent" in reward.stdout
    assert f"{family.label} latents (4, 8, 8)" in reward.stdout
    assert (folder / "models" / "reward_model.safetensors").is_file()
    assert "epoch 1: reward" in policy.stdout
    outputs = folder / "outputs"
    assert {"fox_diffusers_lora_epoch_1.safetensors", "fox_ui_lora_epoch_1.safetensors",
            "fox_ui_lora_epoch_1.preview.png", "fox_optimizer_epoch_1.pt",
            "fox_preview_epoch_1.png"} <= set(os.listdir(outputs))
    assert not any(name.startswith(("diffusers_lora", "ui_lora", "optimizer")) for name in os.listdir(outputs))


@pytest.mark.stages
def test_the_ui_lora_carries_kohyas_metadata_and_a_preview_card(family, trained_from_the_file, family_file):
    folder, _, _ = trained_from_the_file
    with safe_open(str(folder / "outputs" / "fox_ui_lora_epoch_1.safetensors"), "pt") as f:
        metadata = f.metadata()
        assert len(list(f.keys())) == 3 * family.attention_linears
    expected = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0",
                "ss_output_name": "fox_ui_lora_epoch_1", "ss_epoch": "1",
                "ss_sd_model_name": f"tiny-{family.name}.safetensors", "ss_resolution": "(64, 64)",
                "modelspec.sai_model_spec": "1.0.0", "modelspec.title": "fox_ui_lora_epoch_1",
                "modelspec.resolution": "64x64", "modelspec.prediction_type": "epsilon",
                "almostperfect.prompt": "a neon sign", "almostperfect.epoch": "1",
                "almostperfect.reward_model": "reward_model.safetensors",
                "almostperfect.reward_model_sha256": sha256_of_file(folder / "models" / "reward_model.safetensors"),
                "almostperfect.checkpoint": f"tiny-{family.name}",
                "almostperfect.checkpoint_hash": sha256_of_file(family_file)[:10], **LORA_METADATA[family.name]}
    assert {k: metadata.get(k) for k in expected} == expected
    assert metadata["modelspec.date"][:4].isdigit() and "T" in metadata["modelspec.date"]
    with Image.open(folder / "outputs" / "fox_ui_lora_epoch_1.preview.png") as card:
        assert card.format == "PNG" and card.size == (64, 64)  # one image of the LoRA, not the grid


@pytest.mark.stages
@pytest.mark.parametrize("family", ["sd15"], indirect=True)
def test_resume_and_generates_latest_find_the_prefixed_files(trained_from_the_file, family_file, family_checkpoint):
    folder, _, _ = trained_from_the_file
    settings = parse_settings([f"--lora_path={folder / 'outputs'}", "--lora_name_prefix=fox_"], generate.USED_SETTINGS)
    assert generate.resolve_lora(settings) == str(folder / "outputs" / "fox_diffusers_lora_epoch_1.safetensors")
    settings = parse_settings([f"--lora_path={folder / 'outputs'}"], generate.USED_SETTINGS)
    assert generate.resolve_lora(settings) is None  # another prefix's (here: none) LoRAs are not this run's
    resumed = assert_ok(run_script("train_policy", "--train_policy_num_epochs=2", *POLICY,
                                   f"--checkpoint_config={family_checkpoint}", cwd=folder, checkpoint=family_file))
    assert f"resuming after epoch 1 from {folder / 'outputs' / 'fox_resume_state.pt'}" in resumed.stdout
    assert (folder / "outputs" / "fox_ui_lora_epoch_2.safetensors").is_file()
