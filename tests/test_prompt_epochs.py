"""Prompt sets in train_policy: each epoch's prompt groups, each image's own text conditioning, the per-prompt
advantage baseline, against a transcription of upstream's loop; and the stage script with a prompt file.

The reference epoch is tests/test_ddpo_reference.py's transcription of upstream's training loop, with the
two changes a prompt list makes, written out plainly: the positive half of every guided UNet call is each
image's own text embedding (and for SDXL its own pooled embedding), encoded here by the pipeline itself;
and an image's advantage is its reward minus the mean reward of the images with the same prompt, over
the epoch's std.
"""

import hashlib
import json
import random

import pytest
import torch
from safetensors.torch import load_file
from test_ddpo_reference import fresh, lora_weights, seed_log_prob
from test_multiprocess import launch

from conftest import assert_ok, run_scripts
from ddpo.lora import add_lora
from ddpo.ppo import compute_advantages
from ddpo.precision import MixedPrecision
from ddpo.reward_model import LatentRewardModel
from ddpo.sampling import Denoiser, sample_with_logprob
from train_policy import prompt_groups, sample_epoch, train_epoch, training_minibatches
from utils.conditioning import PromptSet, pipeline_encoder
from utils.pipeline import load_pipeline
from utils.prompts import epoch_prompts, expand
from utils.reward_files import save_reward_model

IMAGES, STEPS, GUIDANCE, ETA, SIZE = 8, 3, 5.0, 1.0, 64
CLIP_RANGE, ADV_CLIP_MAX, SHUFFLE_SEED, LEARNING_RATE = 1e-4, 2.0, 11, 1e-2
NEGATIVE = "worst quality, low quality"
# four groups of two images; "a red car" twice, so its two groups pool into one baseline as Flow-GRPO's do
TEXTS = ["a red car"] * 2 + ["a cat"] * 2 + ["a red car"] * 2 + ["a house at night"] * 2


# ---------------------------------------------------------------- drawing the epoch's prompts

def test_an_epochs_prompts_are_a_function_of_seed_and_epoch_and_go_through_the_list():
    lines = ["a cat", "a dog", "a car", "a house"]
    drawn = [epoch_prompts(lines, 3, epoch, 2) for epoch in (1, 2, 3, 4)]
    assert drawn == [epoch_prompts(lines, 3, epoch, 2) for epoch in (1, 2, 3, 4)]
    # epochs 1-2 and 3-4 are each one lap of the list: every line once before any repeats
    assert sorted(drawn[0] + drawn[1]) == sorted(lines) == sorted(drawn[2] + drawn[3])
    assert len({tuple(epoch_prompts(lines, seed, 1, 4)) for seed in range(6)}) > 1  # the seed shuffles the laps
    assert epoch_prompts(["a neon sign"], 0, 7, 3) == ["a neon sign"] * 3


def fake_encoder(encoded):
    """A PromptSet encoder that records what it encodes; each text's embedding holds its length."""
    def encode(texts):
        encoded.extend(texts)
        return {text: {"positive_embeds": torch.full((1, 77, 4), float(len(text))),
                       "negative_embeds": torch.zeros(1, 77, 4)} for text in texts}
    return encode


def test_all_images_of_a_group_share_one_drawn_variant_and_its_conditioning():
    encoded = []
    prompts = PromptSet(["a {red|green|blue|grey|pink} car at {dawn|noon|dusk|night}"], fake_encoder(encoded),
                        encoded_up_front=10)  # 20 variants: more than 10, so encoded per epoch
    assert not prompts.all_up_front
    texts = prompts.image_prompts(seed=5, epoch=1, images=12, per_prompt=3)
    groups = [texts[i:i + 3] for i in range(0, 12, 3)]
    assert all(len(set(group)) == 1 for group in groups) and len({group[0] for group in groups}) > 1
    assert all("{" not in text for text in texts)
    prompts.prepare(texts)
    assert set(prompts.cache) == set(texts)  # the epoch's texts only
    record = prompts.record(texts)
    assert record["prompt_embeds"].shape == (12, 77, 4)
    assert record["prompt_embeds"][:, 0, 0].tolist() == [float(len(text)) for text in texts]
    assert len(encoded) == len(set(encoded))  # each text encoded once


def test_few_distinct_prompts_are_all_encoded_up_front():
    encoded = []
    prompts = PromptSet(["a {red|blue} car", "a cat"], fake_encoder(encoded))
    assert prompts.all_up_front and sorted(encoded) == ["a blue car", "a cat", "a red car"]
    prompts.prepare(prompts.image_prompts(seed=0, epoch=3, images=4, per_prompt=2))
    assert len(encoded) == 3


def test_per_prompt_advantages_use_each_prompts_mean_and_the_epochs_std():
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0, 5.0, 7.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 3])  # prompt 2 and prompt 3 have one image each
    std = rewards.std()
    expected = torch.tensor([-1.0, 1.0, -2.0, 2.0, 0.0, 0.0]) / std
    torch.testing.assert_close(compute_advantages(rewards, 100.0, groups), expected)
    torch.testing.assert_close(compute_advantages(rewards, 0.3, groups), expected.clamp(-0.3, 0.3))  # clipped as before
    torch.testing.assert_close(compute_advantages(rewards, 2.0), ((rewards - rewards.mean()) / std).clamp(-2, 2))


# ---------------------------------------------------------------- the multi-prompt epoch against the reference

@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def epoch(request):
    """(pipeline, Denoiser of its UNet with a LoRA, PromptSet, the epoch's samples with each image's prompt,
    rewards) for the tiny SD1.5 or SDXL checkpoint, as train_policy has them."""
    pipeline = load_pipeline(request.getfixturevalue(
        "tiny_checkpoint" if request.param == "sd15" else "tiny_sdxl_checkpoint"), "cpu", torch.float32)
    torch.manual_seed(0)
    add_lora(pipeline.unet, rank=4)
    with torch.no_grad():
        for name, parameter in pipeline.unet.named_parameters():
            if "lora_B" in name:  # peft's zeros would leave every lora_A without a gradient
                parameter.normal_(std=0.1)
    prompts = PromptSet(sorted(set(TEXTS)), pipeline_encoder(pipeline, NEGATIVE, SIZE, SIZE, "cpu", offload=False))
    denoiser = Denoiser(pipeline.unet, pipeline.scheduler, guidance_scale=GUIDANCE, eta=ETA,
                        **prompts.conditioning(TEXTS[0]))
    samples = sample_epoch(denoiser, lambda latents: latents.mean(dim=(1, 2, 3)), list(range(IMAGES)),
                           prompts.record(TEXTS), 4, SIZE, SIZE, STEPS, False)
    rewards = torch.randn(IMAGES, generator=torch.Generator().manual_seed(1)) * 3  # some advantages get clipped
    return pipeline, denoiser, prompts, samples, rewards


def reference_conditioning(pipeline, text):
    """The seed's encoding of one prompt, for either family: (positive, negative) hidden states (1, 77, dim)
    and, for SDXL, (positive, negative) pooled embeddings (1, pooled dim)."""
    with torch.no_grad():
        return list(pipeline.encode_prompt(text, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=True, negative_prompt=NEGATIVE))


def per_prompt_advantages(rewards, texts):
    """Each image's reward minus its prompt's mean reward, over the epoch's std; alone with its prompt, 0."""
    std = rewards.std()
    advantages = []
    for i, text in enumerate(texts):
        same = [rewards[j] for j in range(len(texts)) if texts[j] == text]
        advantages.append(0.0 if len(same) == 1 else float((rewards[i] - sum(same) / len(same)) / (std + 1e-8)))
    return torch.tensor(advantages).clamp(-ADV_CLIP_MAX, ADV_CLIP_MAX)


def reference_epoch(pipeline, denoiser, samples, rewards, batch_size):
    """The seed's loop (tests/test_ddpo_reference.py) with each image's own prompt and the per-prompt
    baseline, one SGD step for the epoch; the images in train_policy's shuffled order."""
    model = fresh(denoiser)
    unet, scheduler = model.unet, model.scheduler
    optimizer = torch.optim.SGD([p for p in unet.parameters() if p.requires_grad], lr=LEARNING_RATE)
    encoded = {text: reference_conditioning(pipeline, text) for text in set(TEXTS)}
    advantages = per_prompt_advantages(rewards, TEXTS)
    order = torch.randperm(IMAGES, generator=torch.Generator().manual_seed(SHUFFLE_SEED)).tolist()
    sdxl = unet.config.addition_embed_type == "text_time"
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)  # original, crop, target
    unet.train()
    for start in range(0, IMAGES, batch_size):
        images = order[start:start + batch_size]
        b = len(images)
        negative = encoded[TEXTS[0]][1]
        embeds = torch.cat([negative.expand(b, -1, -1), *(encoded[TEXTS[i]][0] for i in images)])
        added = None
        if sdxl:
            pooled = torch.cat([encoded[TEXTS[0]][3].expand(b, -1), *(encoded[TEXTS[i]][2] for i in images)])
            added = {"text_embeds": pooled, "time_ids": time_ids.expand(2 * b, -1)}
        for j in range(STEPS):
            latents, t = samples["latents"][images, j], samples["timesteps"][images, j]
            noise_pred = unet(torch.cat([latents] * 2), torch.cat([t] * 2), embeds, added_cond_kwargs=added).sample
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + GUIDANCE * (noise_pred_text - noise_pred_uncond)
            log_prob = seed_log_prob(scheduler, noise_pred, int(t[0]), latents, samples["latents"][images, j + 1], ETA)
            ratio = torch.exp(log_prob - samples["log_probs"][images, j])
            unclipped_loss = -advantages[images] * ratio
            clipped_loss = -advantages[images] * torch.clamp(ratio, 1.0 - CLIP_RANGE, 1.0 + CLIP_RANGE)
            torch.mean(torch.maximum(unclipped_loss, clipped_loss)).backward()
    optimizer.step()
    return lora_weights(unet)


def test_each_image_is_sampled_with_its_own_prompt_as_alone(epoch):
    pipeline, denoiser, _, samples, _ = epoch
    for i in (0, 2, 7):  # one image of each of three prompts
        positive, negative, *pooled = reference_conditioning(pipeline, TEXTS[i])
        added = {} if not pooled else {
            "positive_added": {"text_embeds": pooled[0], "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]])},
            "negative_added": {"text_embeds": pooled[1], "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]])}}
        alone = Denoiser(denoiser.unet, denoiser.scheduler, positive, negative, GUIDANCE, ETA, **added)
        expected = sample_with_logprob(alone, [torch.Generator().manual_seed(i)], SIZE, SIZE, STEPS)
        torch.testing.assert_close(samples["latents"][i], expected["latents"][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(samples["prompt_embeds"][i], positive[0])
    assert not torch.equal(samples["prompt_embeds"][0], samples["prompt_embeds"][2])  # the prompts differ


@pytest.mark.parametrize("batch_size, timesteps_per_call, checkpointing", [
    (2, 2, False),  # two images of different prompts per UNet call, calls of 2 and 1 timesteps
    (1, STEPS, True),  # gradient checkpointing, all timesteps in one call
])
def test_a_multi_prompt_epoch_gives_the_references_lora_weights(epoch, batch_size, timesteps_per_call, checkpointing):
    pipeline, denoiser, _, samples, rewards = epoch
    expected = reference_epoch(pipeline, denoiser, samples, rewards, batch_size)

    trainer = fresh(denoiser, checkpointing)
    optimizer = torch.optim.SGD([p for p in trainer.unet.parameters() if p.requires_grad], lr=LEARNING_RATE)
    advantages = compute_advantages(rewards, ADV_CLIP_MAX, prompt_groups(TEXTS))
    shuffle = torch.Generator().manual_seed(SHUFFLE_SEED)
    minibatches = training_minibatches(samples, advantages, batch_size, 1.0, shuffle)
    train_epoch(trainer, optimizer, minibatches, CLIP_RANGE, timesteps_per_call, 1, MixedPrecision.create("no", "cpu"))
    actual = lora_weights(trainer.unet)

    update = (expected - lora_weights(denoiser.unet)).abs().max().item()
    assert update > 1e-6, "the reference epoch must move the LoRA for the comparison to mean anything"
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=update * 1e-3)


def test_one_prompts_baseline_differs_from_the_epochs(epoch):
    """The two baselines are not the same update in disguise: the comparison above can tell them apart."""
    _, _, _, _, rewards = epoch
    assert (compute_advantages(rewards, ADV_CLIP_MAX, prompt_groups(TEXTS))
            - compute_advantages(rewards, ADV_CLIP_MAX)).abs().max() > 0.1


# ---------------------------------------------------------------- the stage script

POLICY = ["--train_sample_batch_size=2", "--train_sample_num_batches_per_epoch=2", "--train_preview_seeds=",
          "--train_save_freq=1"]
PROMPT_LINES = ["a cat", "a {red|blue} car", "a house at night", "a dog"]


def metrics(folder):
    with open(folder / "outputs" / "policy_metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, tiny_checkpoint, tiny_sdxl_checkpoint, random_reward_model):
    """train_policy runs: one-line file vs prompt; a 4-line list straight for 2 epochs, for 1 then resumed
    to 2, and (launched apart) on 2 processes; the list on the tiny SDXL model."""
    root = tmp_path_factory.mktemp("prompt_stage")
    one_line, listed = root / "one_line.txt", root / "prompts.txt"
    one_line.write_text("# the default prompt, from a file\na lighthouse at dusk\n")
    listed.write_text("\n".join(PROMPT_LINES) + "\n")
    folders = {name: root / name for name in ("prompt", "one_line", "straight", "resumed", "two_processes", "sdxl")}
    torch.manual_seed(0)
    sdxl_reward_model = root / "sdxl_reward_model.safetensors"
    save_reward_model(LatentRewardModel(), str(sdxl_reward_model), {"family": "sdxl"})
    common = [f"--reward_model_path={random_reward_model}", *POLICY]
    many = [f"--prompt_file={listed}", "--train_images_per_prompt=2", "--train_advantage_baseline=prompt"]
    calls = [("train_policy", (*common, "--prompt=a lighthouse at dusk", "--train_policy_num_epochs=1"),
              {"cwd": folders["prompt"], "checkpoint": tiny_checkpoint}),
             ("train_policy", (*common, f"--prompt_file={one_line}", "--train_policy_num_epochs=1"),
              {"cwd": folders["one_line"], "checkpoint": tiny_checkpoint}),
             ("train_policy", (*common, *many, "--train_policy_num_epochs=2", "--train_preview_seeds=0,1"),
              {"cwd": folders["straight"], "checkpoint": tiny_checkpoint}),
             ("train_policy", (*common, *many, "--train_policy_num_epochs=1"),
              {"cwd": folders["resumed"], "checkpoint": tiny_checkpoint}),
             ("train_policy", (*common, *many, f"--reward_model_path={sdxl_reward_model}",
                               "--train_policy_num_epochs=1", "--train_preview_seeds=0"),
              {"cwd": folders["sdxl"], "checkpoint": tiny_sdxl_checkpoint})]
    for folder in folders.values():
        folder.mkdir()
    for result in run_scripts(calls):
        assert_ok(result)
    assert_ok(run_scripts([("train_policy", (*common, *many, "--train_policy_num_epochs=2"),
                            {"cwd": folders["resumed"], "checkpoint": tiny_checkpoint})])[0])
    launch("train_policy", tmp_path_factory.mktemp("probe"), *common, *many, "--train_policy_num_epochs=2",
           cwd=folders["two_processes"], checkpoint=tiny_checkpoint)
    return folders


@pytest.mark.stages
def test_a_one_line_prompt_file_trains_the_same_lora_as_that_prompt(stage_runs):
    a, b = (load_file(str(stage_runs[name] / "outputs" / "diffusers_lora_epoch_1.safetensors"))
            for name in ("prompt", "one_line"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.stages
def test_the_same_seed_and_epoch_draw_the_same_prompts_after_a_resume_and_on_two_processes(stage_runs):
    straight, resumed, two = (metrics(stage_runs[name]) for name in ("straight", "resumed", "two_processes"))
    assert [m["prompts"] for m in straight] == [m["prompts"] for m in resumed] == [m["prompts"] for m in two]
    assert [m["prompts"] for m in straight] == [epoch_prompts(PROMPT_LINES, 0, epoch, 2) for epoch in (1, 2)]
    # each process sampled its images with their own prompts: the rewards are those of one process
    for runs in (resumed, two):
        for mine, theirs in zip(straight, runs):
            assert mine["reward_mean"] == pytest.approx(theirs["reward_mean"], rel=1e-5, abs=1e-7)
            assert mine["reward_std"] == pytest.approx(theirs["reward_std"], rel=1e-5)


@pytest.mark.stages
def test_the_lora_names_its_prompts_and_the_preview_shows_two_of_them_and_one_not_in_the_list(stage_runs):
    from PIL import Image
    from safetensors import safe_open

    outputs = stage_runs["straight"] / "outputs"
    with safe_open(str(outputs / "ui_lora_epoch_2.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["almostperfect.prompt_lines"]) == PROMPT_LINES
    assert metadata["almostperfect.prompt_count"] == "4" and "almostperfect.prompt" not in metadata
    assert metadata["almostperfect.prompt_lines_sha256"] == hashlib.sha256("\n".join(PROMPT_LINES).encode()).hexdigest()
    words = json.loads(metadata["ss_tag_frequency"])["prompts.txt"]
    assert words["a"] == 4 and words["red"] == words["blue"] == words["night"] == 1
    with Image.open(outputs / "preview_epoch_2.png") as preview:  # 2 seeds x (3 prompts x base and LoRA rows)
        assert preview.size == (2 * 128, 3 * 2 * (128 + 34))


@pytest.mark.stages
def test_an_sdxl_run_trains_on_the_list_with_its_previews(stage_runs):
    from PIL import Image

    assert metrics(stage_runs["sdxl"])[0]["prompts"] == epoch_prompts(PROMPT_LINES, 0, 1, 2)
    with Image.open(stage_runs["sdxl"] / "outputs" / "preview_epoch_1.png") as preview:
        assert preview.size == (128, 3 * 2 * (128 + 34))


def test_preview_prompts_default_to_two_lines_and_one_not_in_the_list(tmp_path):
    from types import SimpleNamespace

    from utils.prompts import HELD_OUT_PREVIEW_PROMPTS, preview_prompts
    single = {"train_preview_prompts": "", "prompt_file": "", "prompt": "a neon sign"}
    assert preview_prompts(SimpleNamespace(**single)) == ["a neon sign"]  # as before prompt sets
    chosen = SimpleNamespace(**{**single, "train_preview_prompts": " a cat ; a {red|blue} car;"})
    assert preview_prompts(chosen) == ["a cat", expand("a {red|blue} car", random.Random("preview 1"))]
    listed = tmp_path / "prompts.txt"
    listed.write_text(f"a cat\n{HELD_OUT_PREVIEW_PROMPTS[0]}\na dog\n")
    from_file = preview_prompts(SimpleNamespace(**{**single, "prompt_file": str(listed)}))
    assert from_file == ["a cat", HELD_OUT_PREVIEW_PROMPTS[0], HELD_OUT_PREVIEW_PROMPTS[1]]
