"""The DDPO sampling loop against StableDiffusionPipeline and StableDiffusionXLPipeline on the tiny checkpoints
(same seeds, same latents), the DDIM schedule each gets from its folder, SDXL's added conditioning in every
UNet call, and the same LoRA gradient however a training step is grouped or checkpointed. Each test runs for
both families (the `family` fixture, tests/conftest.py) unless it is about one."""

import copy
from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from conftest import generators
from ddpo.ddim import ddim_step_with_logprob
from ddpo.lora import add_lora
from ddpo.ppo import policy_gradient_backward
from ddpo.sampling import Denoiser, guided_noise_pred, prompt_conditioning, sample_with_logprob
from tools.tiny_checkpoint import sd15_scheduler
from train_policy import training_minibatches
from utils.checkpoint import model_family
from utils.pipeline import load_pipeline

PROMPT, NEGATIVE = "a neon sign", "worst quality, low quality"


@pytest.fixture(scope="module")
def pipeline(family_checkpoint):
    return load_pipeline(family_checkpoint, "cpu", torch.float32)


def denoiser_of(pipeline, height, width, guidance_scale=5.0, eta=1.0):
    conditioning = prompt_conditioning(pipeline, PROMPT, NEGATIVE, height, width, "cpu")
    return Denoiser(pipeline.unet, pipeline.scheduler, guidance_scale=guidance_scale, eta=eta, **conditioning)


@pytest.mark.parametrize("family", ["sdxl"], indirect=True)
def test_an_sdxl_folder_loads_as_sdxl_with_ddim_on_sdxls_schedule(pipeline):
    assert isinstance(pipeline, StableDiffusionXLPipeline) and model_family(pipeline) == "sdxl"
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"  # the folder ships Euler, as SDXL base does
    # SDXL's betas and "leading" spacing are SD1.5's: the DDIM step and its log-prob tests hold as they are
    reference = sd15_scheduler()
    torch.testing.assert_close(pipeline.scheduler.alphas_cumprod, reference.alphas_cumprod)
    pipeline.scheduler.set_timesteps(20)
    reference.set_timesteps(20)
    assert pipeline.scheduler.timesteps.tolist() == reference.timesteps.tolist()
    assert pipeline.vae.config.scaling_factor == 0.13025 and pipeline.vae.config.force_upcast


@pytest.mark.parametrize("index", [0, 10, 19])
def test_the_ddim_step_equals_diffusers_step_with_the_folders_scheduler(pipeline, index):
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(20)
    t = scheduler.timesteps[index]
    generator = torch.Generator().manual_seed(index)
    noise_pred, latents = torch.randn(2, 4, 8, 6, generator=generator), torch.randn(2, 4, 8, 6, generator=generator)
    expected = scheduler.step(noise_pred, t, latents, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    ours, _ = ddim_step_with_logprob(scheduler, noise_pred, t, latents, 1.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("height, width, steps, guidance_scale, eta", [
    (64, 64, 4, 5.0, 1.0),
    (64, 64, 3, 7.5, 0.5),
    (64, 64, 3, 5.0, 1.0),
    (64, 48, 2, 3.0, 1.0),  # not square, as the default 1080x720 is not
    (64, 48, 2, 7.5, 0.5),  # and for SDXL, as 832x1216 is not: the size ids must follow
])
def test_final_latents_equal_the_pipelines(pipeline, height, width, steps, guidance_scale, eta):
    seeds = [3, 1234, 99]
    expected = pipeline(PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_inference_steps=steps,
                        guidance_scale=guidance_scale, eta=eta, num_images_per_prompt=len(seeds),
                        generator=generators(seeds), output_type="latent").images
    denoiser = denoiser_of(pipeline, height, width, guidance_scale, eta)
    record = sample_with_logprob(denoiser, generators(seeds), height, width, steps)
    assert expected.shape == (3, 4, height // 8, width // 8)
    torch.testing.assert_close(record["latents"][:, -1], expected, atol=1e-5, rtol=1e-5)
    # one seed alone gives that seed's image: the per-image generators make a batch order-free
    alone = sample_with_logprob(denoiser, generators(seeds[1:2]), height, width, steps)
    torch.testing.assert_close(alone["latents"][0, -1], expected[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected[0], expected[1], atol=1e-2)
    # each recorded log-prob is that of the recorded step under the model that took it
    for i, t in enumerate(record["timesteps"]):
        noise_pred = guided_noise_pred(denoiser, record["latents"][:, i], t)
        _, log_prob = ddim_step_with_logprob(pipeline.scheduler, noise_pred, t, record["latents"][:, i], eta,
                                             next_latents=record["latents"][:, i + 1])
        torch.testing.assert_close(log_prob, record["log_probs"][:, i], atol=1e-4, rtol=1e-5)


def test_the_record_has_the_documented_shapes_and_consistent_log_probs(pipeline):
    steps, seeds = 3, [5, 6]
    denoiser = denoiser_of(pipeline, 64, 48)
    record = sample_with_logprob(denoiser, generators(seeds), 64, 48, steps)
    assert set(record) == {"latents", "log_probs", "timesteps"}
    assert record["latents"].shape == (2, steps + 1, 4, 8, 6)
    assert record["latents"].dtype == torch.float32
    assert record["log_probs"].shape == (2, steps)
    assert record["timesteps"].tolist() == [667, 334, 1]  # descending DDIM timesteps of SD1.5's (and SDXL's) schedule
    # x_T is the initial noise of the image's random seed
    initial_noise = torch.randn((4, 8, 6), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(record["latents"][1, 0], initial_noise)
    # each recorded log-prob is that of the recorded step under the model that took it
    scheduler = pipeline.scheduler
    for i, t in enumerate(record["timesteps"]):
        latents = record["latents"][:, i]
        with torch.no_grad():
            noise_pred = guided_noise_pred(denoiser, latents, t)
        _, log_prob = ddim_step_with_logprob(scheduler, noise_pred, t, latents, 1.0,
                                             next_latents=record["latents"][:, i + 1])
        torch.testing.assert_close(log_prob, record["log_probs"][:, i], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("family", ["sdxl"], indirect=True)
def test_the_added_conditioning_reaches_the_unet(pipeline):
    """Other size ids or another pooled embedding change the prediction: none of it is dropped on the way."""
    denoiser = denoiser_of(pipeline, 64, 64)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = guided_noise_pred(denoiser, latents, 501)
        for key, change in (("time_ids", lambda x: x * 2), ("text_embeds", lambda x: x + 1)):
            changed = {**denoiser.positive_added, key: change(denoiser.positive_added[key])}
            other = guided_noise_pred(replace(denoiser, positive_added=changed), latents, 501)
            assert (other - base).abs().max() > 1e-6, key


@pytest.fixture(scope="module")
def policy(pipeline):
    """(Denoiser of the UNet with a LoRA, one minibatch of 2 images x their 3 timesteps, shuffled)."""
    unet = copy.deepcopy(pipeline.unet)
    add_lora(unet, rank=4)
    with torch.no_grad():  # lora_B starts at zero, which would leave every lora_A without a gradient
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    denoiser = replace(denoiser_of(pipeline, 64, 64), unet=unet)
    samples = sample_with_logprob(denoiser, generators([1, 2]), 64, 64, 3)
    samples["timesteps"] = samples["timesteps"].expand(2, -1)
    minibatch = training_minibatches(samples, torch.tensor([1.0, -0.5]), 2, 1.0, torch.Generator().manual_seed(0))[0]
    unet.train()
    return denoiser, minibatch


def lora_gradient(denoiser, minibatch, timesteps_per_call):
    denoiser.unet.zero_grad(set_to_none=True)
    policy_gradient_backward(denoiser, minibatch, 1e-4, timesteps_per_call)
    return torch.cat([p.grad.flatten() for p in denoiser.unet.parameters() if p.requires_grad])


def test_the_lora_gradient_is_the_same_for_any_grouping_and_with_checkpointing(policy, checkpoint_recomputations):
    denoiser, minibatch = policy
    one_at_a_time = lora_gradient(denoiser, minibatch, 1)
    assert all(p.grad.abs().max() > 0 for p in denoiser.unet.parameters() if p.requires_grad)
    tolerance = dict(rtol=1e-4, atol=1e-5 * one_at_a_time.abs().max().item())
    for per_call in (2, 3):
        torch.testing.assert_close(lora_gradient(denoiser, minibatch, per_call), one_at_a_time, **tolerance)
    checkpointed = replace(denoiser, unet=copy.deepcopy(denoiser.unet))
    checkpointed.unet.enable_gradient_checkpointing()
    torch.testing.assert_close(lora_gradient(checkpointed, minibatch, 3), one_at_a_time, **tolerance)
    assert checkpoint_recomputations, "diffusers did not checkpoint any block"
