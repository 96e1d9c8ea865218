"""The DDPO sampling loop against StableDiffusionPipeline on the tiny checkpoint: same seeds, same latents."""

import pytest
import torch

from conftest import generators
from ddpo.ddim import ddim_step_with_logprob
from ddpo.sampling import Denoiser, encode_prompt, guided_noise_pred, sample_with_logprob
from utils.pipeline import load_pipeline

PROMPT, NEGATIVE = "a neon sign", "worst quality, low quality"


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, "cpu", torch.float32)


@pytest.mark.parametrize("height, width, steps, guidance_scale, eta", [
    (64, 64, 4, 5.0, 1.0),
    (64, 64, 3, 7.5, 0.5),
    (64, 48, 2, 3.0, 1.0),  # not square, as the default 1080x720 is not
])
def test_final_latents_equal_the_pipelines(pipeline, height, width, steps, guidance_scale, eta):
    seeds = [3, 1234, 99]
    expected = pipeline(PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_inference_steps=steps,
                        guidance_scale=guidance_scale, eta=eta, num_images_per_prompt=len(seeds),
                        generator=generators(seeds), output_type="latent").images
    denoiser = Denoiser(pipeline.unet, pipeline.scheduler, *encode_prompt(pipeline, PROMPT, NEGATIVE, "cpu"),
                        guidance_scale, eta)
    record = sample_with_logprob(denoiser, generators(seeds), height, width, steps)
    assert expected.shape == (3, 4, height // 8, width // 8)
    torch.testing.assert_close(record["latents"][:, -1], expected, atol=1e-5, rtol=1e-5)
    # one seed alone gives that seed's image: the per-image generators make a batch order-free
    alone = sample_with_logprob(denoiser, generators(seeds[1:2]), height, width, steps)
    torch.testing.assert_close(alone["latents"][0, -1], expected[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected[0], expected[1], atol=1e-2)


def test_the_record_has_the_documented_shapes_and_consistent_log_probs(pipeline):
    steps, seeds = 3, [5, 6]
    denoiser = Denoiser(pipeline.unet, pipeline.scheduler, *encode_prompt(pipeline, PROMPT, NEGATIVE, "cpu"), 5.0, 1.0)
    record = sample_with_logprob(denoiser, generators(seeds), 64, 48, steps)
    assert set(record) == {"latents", "log_probs", "timesteps"}
    assert record["latents"].shape == (2, steps + 1, 4, 8, 6)
    assert record["latents"].dtype == torch.float32
    assert record["log_probs"].shape == (2, steps)
    assert record["timesteps"].tolist() == [667, 334, 1]  # descending DDIM timesteps of SD1.5's schedule
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
