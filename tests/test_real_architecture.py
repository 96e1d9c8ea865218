"""SD1.5's real architecture end to end: random weights in the shapes of the configs that come with the
project (860M-parameter UNet, 123M CLIP text encoder, the 4-block VAE, CLIP's real tokenizer), written
once as a diffusers folder and once as a WebUI-style single fp16 file, each run through
generate -> rating -> train_reward (VAE-encoding one image) -> train_policy at 64x64 with 2 steps.

Slow (about 5 minutes on 2 busy CPU cores; needs about 7 GiB of free memory: one stage at a time holds
SD1.5 in fp32); `-m "not slow"` skips it.
"""

import os
import resource
import time

import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from helpers import PLANNED_SEEDS, planned_round
from ldm_checkpoint import write_single_file
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from conftest import assert_ok, assert_same_image, run_script
from tools.scripted_rater import rate_by_latent_channel
from utils.checkpoint import CONFIGS, clip_tokenizers
from utils.samples import latent_file, round_images

POLICY = ["--train_policy_num_epochs=1", "--train_save_freq=1", "--train_sample_batch_size=2",
          "--train_sample_num_batches_per_epoch=1", "--train_policy_batch_size=2", "--train_preview_seeds=0"]


def parameters(model):
    return sum(p.numel() for p in model.parameters())


def random_sd15(folder):
    """SD1.5's architecture with random weights, from the shipped configs, saved in fp16; returns the pipeline."""
    configs = CONFIGS / "sd15"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(configs / "unet")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(configs / "vae")))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(configs / "text_encoder")))
    scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(str(configs / "scheduler")))
    pipeline = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **clip_tokenizers("sd15")).to(torch.float16)
    pipeline.save_pretrained(folder)
    return pipeline


@pytest.mark.stages
@pytest.mark.slow
def test_sd15s_architecture_runs_every_stage_from_a_folder_and_from_a_single_file(tmp_path):
    started = time.perf_counter()
    pipeline = random_sd15(tmp_path / "sd15")
    assert parameters(pipeline.unet) == 859_520_964 and parameters(pipeline.text_encoder) == 123_060_480
    assert len(pipeline.vae.config.block_out_channels) == 4
    single_file = write_single_file(pipeline, tmp_path / "random-sd15.safetensors", torch.float16)
    with safe_open(single_file, "pt") as f:
        names = list(f.keys())
    weights = len(pipeline.unet.state_dict()) + len(pipeline.vae.state_dict()) + len(pipeline.text_encoder.state_dict())
    assert len(names) == weights == 1130
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(n.startswith(prefixes) for n in names)
    del pipeline  # its tensors go back to the system before the stages load their own copies
    built = time.perf_counter()

    checkpoints = {"folder": str(tmp_path / "sd15"), "file": single_file}
    folders = {kind: tmp_path / kind for kind in checkpoints}
    for kind, checkpoint in checkpoints.items():
        planned_round(folders[kind], checkpoint)

    seconds = {}

    def stage(name, *args):
        """Run a stage from the folder, then from the file: one at a time, so one SD1.5 is in memory at once."""
        started = time.perf_counter()
        results = [assert_ok(run_script(name, *args, cwd=folders[kind], checkpoint=checkpoint, timeout=1200))
                   for kind, checkpoint in checkpoints.items()]
        seconds[name] = time.perf_counter() - started
        return results

    stage("generate", f"--generate_sample_size={len(PLANNED_SEEDS)}", "--generate_batch_size=3")
    names = round_images(folders["file"] / "samples")
    assert names == round_images(folders["folder"] / "samples") and len(names) == len(PLANNED_SEEDS)
    for name in names:  # the same fp16 weights, loaded either way: the same images
        assert_same_image(folders["file"] / "samples", folders["folder"] / "samples", name)
    for folder in folders.values():
        rate_by_latent_channel(str(folder / "samples"), channel=0)
        os.remove(latent_file(str(folder / "samples"), names[0]))  # train_reward encodes this one with the VAE
    for result in stage("train_reward", "--train_reward_num_epochs=2", "--train_reward_batch_size=2",
                        "--train_reward_test_split_ratio=0"):
        assert "VAE-encoding 1 images" in result.stdout
    for result in stage("train_policy", *POLICY):
        assert "epoch 1: reward" in result.stdout
    for folder in folders.values():
        with safe_open(str(folder / "outputs" / "ui_lora_epoch_1.safetensors"), "pt") as f:
            assert len(list(f.keys())) == 384 and f.metadata()["ss_base_model_version"] == "sd_v1"
        assert (folder / "outputs" / "ui_lora_epoch_1.preview.png").is_file()

    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the largest stage process
    own_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # building the model
    print(f"\nSD1.5 architecture: built and written in {built - started:.0f} s; from the folder then the file, "
          + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
          + f"; peak memory: a stage {peak_gib:.1f} GiB, building {own_gib:.1f} GiB")
