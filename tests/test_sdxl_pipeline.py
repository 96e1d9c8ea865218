"""The whole loop on the tiny SDXL checkpoint, each stage a subprocess chained only through real files, with
the same commands as for SD1.5 (only checkpoint_path differs): generate -> a scripted rater -> train_reward ->
train_policy -> generate with the LoRA -> train_policy resumed. And a reward model of one family refused
for the other, in one sentence."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_bad_input import assert_refused
from test_pipeline import parse_parameters, pngs, saved_latents, seed_of

from conftest import FP16_ATOL, assert_made_with_lora, assert_ok, generators, run_script, snapshot
from ddpo.statistics import pearson
from tools.scripted_rater import rate_by_latent_channel
from utils.cli import stage_paths
from utils.pipeline import load_pipeline
from utils.reward_files import load_reward_model, reward_model_metadata
from utils.samples import latent_family, latent_file

PROMPT, NEGATIVE = "a red fox", "blurry, jpeg"
GUIDANCE, ETA, STEPS = 5.0, 1.0, 2  # STEPS is conftest's TINY_SETTINGS num_inference_steps
HEIGHT, WIDTH = 64, 80  # not square: SDXL's size ids must follow the image's size in every stage
RATED_ROUND = 320
SDXL_UI_KEYS = 3 * 560  # down, up and alpha of each of SDXL's attention projections
POLICY = ["--train_save_freq=1", "--train_sample_batch_size=2", "--train_sample_num_batches_per_epoch=2",
          "--train_policy_batch_size=2", "--train_policy_learning_rate=1e-1", "--train_preview_seeds=0,1"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_sdxl_checkpoint):
    folder = tmp_path_factory.mktemp("sdxl_pipeline")

    def run(name, *args):
        return assert_ok(run_script(name, f"--prompt={PROMPT}", f"--negative_prompt={NEGATIVE}",
                                    f"--guidance_scale={GUIDANCE}", f"--eta={ETA}", f"--height={HEIGHT}",
                                    f"--width={WIDTH}", *args, cwd=folder, checkpoint=tiny_sdxl_checkpoint))

    return folder, run


@pytest.fixture(scope="module")
def pipeline(tiny_sdxl_checkpoint):
    return load_pipeline(tiny_sdxl_checkpoint, "cpu", torch.float32)


def pipeline_latents(pipeline, seeds):
    """What StableDiffusionXLPipeline makes for these seeds with the chain's settings: (n, 4, h/8, w/8)."""
    with torch.no_grad():
        return pipeline(PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, eta=ETA, num_images_per_prompt=len(seeds),
                        generator=generators(seeds), output_type="latent").images


@pytest.fixture(scope="module")
def rated_round(workspace):
    folder, run = workspace
    run("generate", f"--generate_sample_size={RATED_ROUND}", "--generate_batch_size=32")
    samples = folder / "samples"
    scores = rate_by_latent_channel(str(samples), channel=0)
    return samples, scores


def test_generate_makes_what_the_sdxl_pipeline_makes_with_webui_parameters(rated_round, pipeline,
                                                                           tiny_sdxl_checkpoint):
    samples, scores = rated_round
    names = pngs(samples)[:6]
    for name in names:
        with Image.open(samples / name) as image:
            assert image.size == (WIDTH, HEIGHT) and image.mode == "RGB"
            prompt, negative, settings = parse_parameters(image.info["parameters"])
        assert (prompt, negative) == (PROMPT, NEGATIVE)
        assert settings["Sampler"] == "DDIM" and settings["Seed"] == str(seed_of(name))
        assert settings["Size"] == f"{WIDTH}x{HEIGHT}" and settings["Model"] == os.path.basename(tiny_sdxl_checkpoint)
        assert latent_family(latent_file(str(samples), name)) == "sdxl"
    latents = saved_latents(samples, names)
    assert latents.shape == (6, 4, HEIGHT // 8, WIDTH // 8)
    torch.testing.assert_close(latents, pipeline_latents(pipeline, [seed_of(n) for n in names]),
                               atol=FP16_ATOL, rtol=1e-3)


@pytest.fixture(scope="module")
def reward_model(rated_round, workspace):
    folder, run = workspace
    result = run("train_reward", "--train_reward_num_epochs=20", "--train_reward_batch_size=16",
                 "--train_reward_test_split_ratio=0.25")
    return folder / "models" / "reward_model.safetensors", result


def test_train_reward_learns_sdxl_latents_and_records_the_family(reward_model, rated_round):
    path, result = reward_model
    samples, scores = rated_round
    assert f"SDXL latents (4, {HEIGHT // 8}, {WIDTH // 8})" in result.stdout
    metadata = reward_model_metadata(str(path))
    assert metadata["family"] == "sdxl" and metadata["latent_shape"] == [4, HEIGHT // 8, WIDTH // 8]
    names = list(scores)
    predicted = load_reward_model(str(path))(saved_latents(samples, names))
    assert pearson(predicted, torch.tensor([float(scores[n]) for n in names])) > 0.7


@pytest.fixture(scope="module")
def policy(reward_model, workspace):
    folder, run = workspace
    result = run("train_policy", "--train_policy_num_epochs=2", *POLICY)
    return folder / "outputs", result


def test_train_policy_trains_an_sdxl_lora_that_the_uis_and_diffusers_load(policy, pipeline):
    outputs, result = policy
    assert "epoch 2: reward" in result.stdout, result.stdout
    for epoch in (1, 2):
        for name in (f"diffusers_lora_epoch_{epoch}.safetensors", f"ui_lora_epoch_{epoch}.safetensors",
                     f"optimizer_epoch_{epoch}.pt", f"preview_epoch_{epoch}.png"):
            assert (outputs / name).is_file(), name
    ui = load_file(outputs / "ui_lora_epoch_2.safetensors")
    assert len(ui) == SDXL_UI_KEYS
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_1_", "lora_unet_output_blocks_"))
               for k in ui)
    with safe_open(str(outputs / "ui_lora_epoch_2.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    first, second = (load_file(outputs / f"diffusers_lora_epoch_{e}.safetensors") for e in (1, 2))
    assert any(not torch.equal(first[k], second[k]) for k in first)  # epoch 2 trained on
    with open(outputs / "policy_metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]


def test_generate_with_the_sdxl_lora_makes_what_the_pipeline_makes_with_it_loaded(policy, workspace, pipeline):
    outputs, _ = policy
    folder, run = workspace
    result = run("generate", "--generate_sample_size=3")
    lora = outputs / "diffusers_lora_epoch_2.safetensors"
    assert f"LoRA: {lora}" in result.stdout and "moved the earlier round to" in result.stdout
    names = pngs(folder / "samples")
    seeds, latents = [seed_of(n) for n in names], saved_latents(folder / "samples", names)
    assert_made_with_lora(pipeline, lora, latents, lambda p: pipeline_latents(p, seeds))


def test_train_policy_on_sdxl_resumes_at_the_next_epoch(policy, workspace):
    outputs, _ = policy
    folder, run = workspace
    before = snapshot(outputs)
    result = run("train_policy", "--train_policy_num_epochs=3", *POLICY, "--train_policy_learning_rate=0")
    assert f"resuming after epoch 2 from {outputs / 'resume_state.pt'}" in result.stdout
    assert "epoch 2: reward" not in result.stdout
    after = snapshot(outputs)
    assert all(after[name] == state for name, state in before.items() if "epoch_" in name)
    second, third = (load_file(outputs / f"diffusers_lora_epoch_{e}.safetensors") for e in (2, 3))
    assert all(torch.equal(second[k], third[k]) for k in second)  # learning rate 0: it started from epoch 2's


def test_a_reward_model_of_one_family_is_refused_for_the_other(reward_model, tiny_checkpoint, tmp_path):
    sdxl_reward_model, _ = reward_model
    paths = stage_paths(tmp_path, tiny_checkpoint)
    os.makedirs(os.path.dirname(paths["reward_model_path"]))
    shutil.copy(sdxl_reward_model, paths["reward_model_path"])
    result = run_script("train_policy", "--train_policy_num_epochs=1", cwd=tmp_path, checkpoint=tiny_checkpoint)
    assert_refused(result, paths["reward_model_path"], "learned SDXL latents", "SD1.x", "train_reward.py")
    assert not os.path.exists(paths["lora_path"]) or not os.listdir(paths["lora_path"])
    # --rank_folder on an SD1.5 round's saved latents: the same sentence, not a score
    sd15_round = tmp_path / "sd15_round"
    assert_ok(run_script("generate", "--generate_sample_size=2", f"--sample_path={sd15_round}",
                         f"--score_path={sd15_round / 'scores.json'}", cwd=tmp_path,
                         checkpoint=tiny_checkpoint))
    result = run_script("train_reward", f"--rank_folder={sd15_round}", cwd=tmp_path, checkpoint=tiny_checkpoint)
    assert_refused(result, "learned SDXL latents", str(sd15_round), "SD1.x")
