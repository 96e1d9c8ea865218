"""The whole loop, each stage a subprocess on the tiny SD1.5 and SDXL checkpoints with the same commands (only
checkpoint_path and the size differ), chained only through real files: generate -> a scripted rater ->
train_reward -> train_policy -> generate with the LoRA -> train_policy resumed. And a reward model of one
family refused for the other, in one sentence.

The fixtures are the chain's links (module-scoped, each built on the one before, once per family), so any
one test can also run alone.
"""

import json
import os
import re
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FP16_ATOL, assert_made_with_lora, assert_ok, assert_refused, generators, run_script, snapshot
from ddpo.statistics import pearson
from generate import read_round
from tools.scripted_rater import rate_by_latent_channel
from utils.cli import stage_paths
from utils.metrics import read_jsonl
from utils.pipeline import load_pipeline
from utils.reward_files import load_reward_model, reward_model_metadata
from utils.samples import latent_family, latent_file, load_latent

pytestmark = pytest.mark.stages  # every test here runs stage scripts in subprocesses

PROMPT, NEGATIVE = "a red fox", "blurry, jpeg"
GUIDANCE, ETA, STEPS = 5.0, 1.0, 2  # STEPS is conftest's TINY_SETTINGS num_inference_steps
FIRST_ROUND = 6
UMASK = os.umask(0o022)
os.umask(UMASK)
REWARD_EPOCHS = 20
# a learning rate far above a real run's, so that 2 epochs of one optimizer step move the images measurably
POLICY = ["--train_save_freq=1", "--train_sample_batch_size=2", "--train_sample_num_batches_per_epoch=2",
          "--train_policy_batch_size=2", "--train_policy_learning_rate=1e-1", "--train_preview_seeds=0,1"]


class Chain:
    """What differs between the families' chains."""

    def __init__(self, height, width, rated_round, min_correlation, ui_key_starts, base_model_version):
        self.height, self.width = height, width
        # a reward CNN needs a few hundred ratings to learn the rule; 2-step images are cheap
        self.rated_round = rated_round
        self.min_correlation = min_correlation  # of the trained reward model with the rule, on held-out ratings
        self.ui_key_starts = ui_key_starts  # the UI LoRA's keys, as kohya names the family's UNet blocks
        self.base_model_version = base_model_version


CHAINS = {
    "sd15": Chain(64, 64, 480, 0.8, ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_"),
                  "sd_v1"),
    # not square: SDXL's size ids must follow the image's size in every stage
    "sdxl": Chain(64, 80, 320, 0.7, ("lora_unet_input_blocks_", "lora_unet_middle_block_1_",
                                     "lora_unet_output_blocks_"), "sdxl_base_v1-0"),
}


@pytest.fixture(scope="module")
def chain(family):
    return CHAINS[family.name]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, family_checkpoint, chain):
    folder = tmp_path_factory.mktemp("pipeline")

    def run(name, *args):
        return assert_ok(run_script(name, f"--prompt={PROMPT}", f"--negative_prompt={NEGATIVE}",
                                    f"--guidance_scale={GUIDANCE}", f"--eta={ETA}", f"--height={chain.height}",
                                    f"--width={chain.width}", *args, cwd=folder, checkpoint=family_checkpoint))

    return folder, run


@pytest.fixture(scope="module")
def pipeline(family_checkpoint):
    return load_pipeline(family_checkpoint, "cpu", torch.float32)


def pipeline_latents(pipeline, chain, seeds):
    """What the diffusers pipeline makes for these seeds with the chain's settings: (n, 4, h/8, w/8)."""
    with torch.no_grad():
        return pipeline(PROMPT, negative_prompt=NEGATIVE, height=chain.height, width=chain.width,
                        num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=ETA, num_images_per_prompt=len(seeds),
                        generator=generators(seeds), output_type="latent").images


def pngs(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".png"))


def seed_of(name):
    return int(name.removesuffix(".png"))


def saved_latents(samples, names):
    """The latents saved as the on-disk contract says: samples/latents/<seed>.safetensors."""
    return torch.stack([load_latent(os.path.join(samples, "latents", n.removesuffix(".png") + ".safetensors"))
                        for n in names])


def parse_parameters(text):
    """A WebUI `parameters` chunk -> (prompt line, negative prompt, {key: value} of the last line)."""
    lines = text.split("\n")
    assert len(lines) == 3, text
    assert lines[1].startswith("Negative prompt: "), text
    settings = dict(item.split(": ", 1) for item in lines[2].split(", "))
    return lines[0], lines[1].removeprefix("Negative prompt: "), settings


# ---------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def first_round(workspace):
    folder, run = workspace
    result = run("generate", f"--generate_sample_size={FIRST_ROUND}", "--generate_batch_size=4")
    return folder / "samples", result


def test_generate_writes_pngs_latents_and_webui_parameters(first_round, pipeline, family, family_checkpoint, chain):
    samples, result = first_round
    assert "LoRA: none" in result.stdout
    names = pngs(samples)
    assert len(names) == FIRST_ROUND
    assert sorted(f"{s}.png" for s in read_round(str(samples / "round.json"))["seeds"]) == names
    for name in names:
        with Image.open(samples / name) as image:
            assert image.size == (chain.width, chain.height) and image.mode == "RGB"
            prompt, negative, settings = parse_parameters(image.info["parameters"])
        assert prompt == PROMPT and negative == NEGATIVE
        assert settings["Steps"] == str(STEPS)
        assert settings["Sampler"] == "DDIM"
        assert float(settings["CFG scale"]) == GUIDANCE
        assert settings["Seed"] == str(seed_of(name))
        assert settings["Size"] == f"{chain.width}x{chain.height}"
        assert settings["Model"] == os.path.basename(family_checkpoint)
        assert latent_family(latent_file(str(samples), name)) == family.name
    # each saved latent is the one the pipeline makes from the seed in the file name
    latents = saved_latents(samples, names)
    assert latents.shape == (FIRST_ROUND, 4, chain.height // 8, chain.width // 8)
    expected = pipeline_latents(pipeline, chain, [seed_of(n) for n in names])
    torch.testing.assert_close(latents, expected, atol=FP16_ATOL, rtol=1e-3)  # stored in fp16
    assert len({tuple(x.flatten()[:4].tolist()) for x in latents}) == FIRST_ROUND


def test_generate_run_again_makes_only_the_missing_images(first_round, workspace):
    samples, _ = first_round
    folder, run = workspace
    names = pngs(samples)
    for name in names[:2]:
        os.remove(samples / name)
    kept = {k: v for k, v in snapshot(samples).items() if k.endswith(".png")}
    result = run("generate", f"--generate_sample_size={FIRST_ROUND}", "--generate_batch_size=4")
    assert f"{FIRST_ROUND - 2} of {FIRST_ROUND} images already made, generating 2" in result.stdout
    assert pngs(samples) == names
    after = snapshot(samples)
    assert {k: after[k] for k in kept} == kept  # untouched, not rewritten
    assert not (samples / "history").exists()


# ---------------------------------------------------------------- rate and learn the rating


@pytest.fixture(scope="module")
def rated_round(first_round, workspace, chain):
    """The round, grown to the chain's rated_round images (same settings: generate resumes it), rated by a rule."""
    samples, _ = first_round
    folder, run = workspace
    result = run("generate", f"--generate_sample_size={chain.rated_round}", "--generate_batch_size=32")
    assert f"generating {chain.rated_round - FIRST_ROUND}" in result.stdout
    # A rule the saved latent determines exactly, so the reward CNN can learn it from this many ratings;
    # its scores are written in exactly the rating page's format.
    scores = rate_by_latent_channel(str(samples), channel=0)
    assert len(scores) == chain.rated_round and set(scores.values()) <= set(range(-5, 6))
    with open(samples / "scores.json") as f:
        assert json.load(f) == scores
    return samples, scores


@pytest.fixture(scope="module")
def reward_model(rated_round, workspace):
    folder, run = workspace
    result = run("train_reward", f"--train_reward_num_epochs={REWARD_EPOCHS}", "--train_reward_batch_size=16",
                 "--train_reward_test_split_ratio=0.25")
    return folder / "models" / "reward_model.safetensors", result


def test_train_reward_learns_the_rule_the_rater_applied(reward_model, rated_round, family, chain):
    path, result = reward_model
    samples, scores = rated_round
    variance = torch.tensor([float(s) for s in scores.values()]).var(unbiased=False).item()
    match = re.search(r"(\d+) ratings \(mean [-\d.]+, variance ([\d.]+)\): (\d+) to train on, (\d+) held out",
                      result.stdout)
    assert match, result.stdout
    assert int(match.group(1)) == chain.rated_round and int(match.group(4)) == chain.rated_round // 4
    assert float(match.group(2)) == pytest.approx(variance, abs=0.01)
    latent_shape = [4, chain.height // 8, chain.width // 8]
    assert f"{family.label} latents {tuple(latent_shape)}" in result.stdout
    metadata = reward_model_metadata(str(path))
    assert metadata["family"] == family.name and metadata["latent_shape"] == latent_shape
    # held-out ratings, so this is learning, not memorising
    assert metadata["test_spearman"] > chain.min_correlation, result.stdout
    records = read_jsonl(str(path.parent / "reward_metrics.jsonl"))
    assert [r["epoch"] for r in records] == list(range(1, REWARD_EPOCHS + 1))
    assert min(r["test_loss"] for r in records) == pytest.approx(metadata["test_loss"])
    assert (path.parent / "reward_metrics.png").is_file()
    # the saved file, loaded as train_policy loads it, ranks the round's images by the rule
    names = list(scores)
    predicted = load_reward_model(str(path))(saved_latents(samples, names))
    assert pearson(predicted, torch.tensor([float(scores[n]) for n in names])) > chain.min_correlation


# ---------------------------------------------------------------- the policy


@pytest.fixture(scope="module")
def policy(reward_model, workspace):
    folder, run = workspace
    result = run("train_policy", "--train_policy_num_epochs=2", *POLICY)
    return folder / "outputs", result


def test_train_policy_writes_both_loras_optimizer_state_and_metrics_each_save(policy, family, chain):
    outputs, result = policy
    assert re.search(r"epoch 1: reward -?[\d.]+ ± [\d.]+", result.stdout), result.stdout
    assert re.search(r"epoch 2: reward -?[\d.]+ ± [\d.]+", result.stdout), result.stdout
    # on CPU the auto settings put both of an image's 2 timesteps in one call, without checkpointing
    assert "training: 2 timesteps per UNet call (auto), gradient checkpointing off (auto)" in result.stdout, \
        result.stdout
    for epoch in (1, 2):
        for name in (f"diffusers_lora_epoch_{epoch}.safetensors", f"ui_lora_epoch_{epoch}.safetensors",
                     f"optimizer_epoch_{epoch}.pt", f"preview_epoch_{epoch}.png"):
            assert (outputs / name).is_file(), name
            # readable as the user's other files are: a WebUI/ComfyUI running as another user can load it
            assert (outputs / name).stat().st_mode & 0o777 == 0o666 & ~UMASK, name
        ui = load_file(outputs / f"ui_lora_epoch_{epoch}.safetensors")
        assert len(ui) == 3 * family.attention_linears  # down, up and alpha of each attention projection
        assert all(k.startswith(chain.ui_key_starts) for k in ui)
        optimizer = torch.load(outputs / f"optimizer_epoch_{epoch}.pt", weights_only=True)
        # lora_A and lora_B of each layer, all with Adam moments
        assert len(optimizer["state"]) == 2 * family.attention_linears
    with safe_open(str(outputs / "ui_lora_epoch_2.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == chain.base_model_version
    with Image.open(outputs / "preview_epoch_2.png") as preview:
        assert preview.format == "PNG" and preview.width >= 2 * chain.width  # the two preview seeds side by side
    first, second = (load_file(outputs / f"diffusers_lora_epoch_{e}.safetensors") for e in (1, 2))
    assert first.keys() == second.keys() and all(k.startswith("unet.") for k in first)
    ups = [k for k in first if "lora_B" in k or "lora.up" in k]
    assert ups and any(first[k].abs().max() > 0 for k in ups)  # trained away from peft's zero lora_B
    assert any(not torch.equal(first[k], second[k]) for k in first)  # epoch 2 trained on
    records = read_jsonl(str(outputs / "policy_metrics.jsonl"))
    assert [r["epoch"] for r in records] == [1, 2]
    assert all({"reward_mean", "reward_std", "loss", "clipfrac", "approx_kl"} <= r.keys() for r in records)
    assert (outputs / "policy_metrics.png").is_file()


def test_generate_with_the_lora_starts_a_new_round_and_makes_other_images(policy, rated_round, workspace, pipeline,
                                                                          chain):
    outputs, _ = policy
    samples, _ = rated_round
    folder, run = workspace
    rated = snapshot(samples)
    result = run("generate", "--generate_sample_size=3")
    lora = outputs / "diffusers_lora_epoch_2.safetensors"
    assert f"LoRA: {lora}" in result.stdout
    assert "moved the earlier round to" in result.stdout
    # the rated round moved whole, ratings included, nothing rewritten or lost
    assert snapshot(samples / "history" / "round_001") == rated
    names = pngs(samples)
    assert set(os.listdir(samples)) == {"history", "latents", "round.json", *names}
    assert len(names) == 3
    with Image.open(samples / names[0]) as image:
        prompt, _, _ = parse_parameters(image.info["parameters"])
    assert prompt == f"{PROMPT} <lora:ui_lora_epoch_2:1>"
    # the same seeds without the LoRA make other latents; with it loaded, these
    seeds = [seed_of(n) for n in names]
    latents = saved_latents(samples, names)
    assert_made_with_lora(pipeline, lora, latents, lambda p: pipeline_latents(p, chain, seeds))


def test_train_policy_run_again_resumes_at_the_next_epoch_and_keeps_earlier_files(policy, workspace):
    outputs, _ = policy
    folder, run = workspace
    before = snapshot(outputs)
    # learning rate 0: epoch 3 then ends exactly where it started, which shows where that was
    result = run("train_policy", "--train_policy_num_epochs=3", *POLICY, "--train_policy_learning_rate=0")
    assert f"resuming after epoch 2 from {outputs / 'resume_state.pt'}" in result.stdout
    assert "epoch 3: reward" in result.stdout
    assert "epoch 1: reward" not in result.stdout and "epoch 2: reward" not in result.stdout
    after = snapshot(outputs)
    for name, state in before.items():
        if "epoch_" in name:
            assert after[name] == state, f"{name} changed"
    for name in ("diffusers_lora_epoch_3.safetensors", "ui_lora_epoch_3.safetensors", "optimizer_epoch_3.pt"):
        assert name in after
    assert [record["epoch"] for record in read_jsonl(str(outputs / "policy_metrics.jsonl"))] == [1, 2, 3]
    # epoch 3 started from epoch 2's LoRA and optimizer state (one step an epoch, upstream's), not from fresh ones
    second, third = (load_file(outputs / f"diffusers_lora_epoch_{e}.safetensors") for e in (2, 3))
    assert second.keys() == third.keys() and all(torch.equal(second[k], third[k]) for k in second)
    steps = {e: torch.load(outputs / f"optimizer_epoch_{e}.pt", weights_only=True)["state"][0]["step"].item()
             for e in (1, 2, 3)}
    assert steps == {1: 1, 2: 2, 3: 3}


@pytest.mark.parametrize("family", ["sdxl"], indirect=True)
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
                         f"--score_path={sd15_round / 'scores.json'}",
                         f"--comparison_path={sd15_round / 'comparisons.json'}", cwd=tmp_path,
                         checkpoint=tiny_checkpoint))
    result = run_script("train_reward", f"--rank_folder={sd15_round}", cwd=tmp_path, checkpoint=tiny_checkpoint)
    assert_refused(result, "learned SDXL latents", str(sd15_round), "SD1.x")
