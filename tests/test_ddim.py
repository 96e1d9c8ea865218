"""ddim_step_with_logprob against diffusers' DDIMScheduler.step and an independent Gaussian log-density."""

import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch.distributions import Normal

from ddpo.ddim import ddim_step_with_logprob
from tools.tiny_checkpoint import sd15_scheduler
from utils.checkpoint import CONFIGS

STEPS = 20
SHAPE = (3, 4, 8, 8)


@pytest.fixture
def scheduler():
    scheduler = sd15_scheduler()
    scheduler.set_timesteps(STEPS)
    return scheduler


def inputs(seed, shape=SHAPE):
    generator = torch.Generator().manual_seed(seed)
    noise_pred = torch.randn(shape, generator=generator)
    latents = torch.randn(shape, generator=generator) * 3
    return noise_pred, latents


def reference_mean_std(scheduler, noise_pred, latents, t, eta):
    """DDIM paper eq. (12) and (16) in float64, from the schedule's alphas_cumprod alone."""
    alphas_cumprod = scheduler.alphas_cumprod.double()
    prev_t = t - scheduler.config.num_train_timesteps // STEPS
    alpha_t = alphas_cumprod[t]
    alpha_prev = alphas_cumprod[prev_t] if prev_t >= 0 else alphas_cumprod[0]  # set_alpha_to_one=False
    eps, x_t = noise_pred.double(), latents.double()
    x_0 = (x_t - torch.sqrt(1 - alpha_t) * eps) / torch.sqrt(alpha_t)
    sigma = eta * torch.sqrt((1 - alpha_prev) / (1 - alpha_t)) * torch.sqrt(1 - alpha_t / alpha_prev)
    mean = torch.sqrt(alpha_prev) * x_0 + torch.sqrt(1 - alpha_prev - sigma**2) * eps
    return mean, sigma


def test_the_schedule_is_sd15s_twenty_steps(scheduler):
    # SD1.5's scaled_linear betas in float64, and "leading" spacing with steps_offset=1: 951, 901, ..., 1
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), atol=1e-6, rtol=1e-5)
    assert scheduler.timesteps.tolist() == [1000 // STEPS * i + 1 for i in reversed(range(STEPS))]
    # and it is the schedule of the scheduler SD1.5 ships, as load_pipeline turns it into DDIM
    shipped = DDIMScheduler.from_config(DDIMScheduler.load_config(str(CONFIGS / "sd15" / "scheduler")))
    shipped.set_timesteps(STEPS)
    torch.testing.assert_close(shipped.alphas_cumprod, scheduler.alphas_cumprod)
    assert shipped.timesteps.tolist() == scheduler.timesteps.tolist()
    assert shipped.config.set_alpha_to_one == scheduler.config.set_alpha_to_one is False


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("index", [0, 1, 10, STEPS - 2, STEPS - 1])
def test_step_equals_diffusers_step_for_the_same_noise(scheduler, index, eta):
    t = scheduler.timesteps[index]
    noise_pred, latents = inputs(index)
    expected = scheduler.step(noise_pred, t, latents, eta=eta, generator=torch.Generator().manual_seed(7)).prev_sample
    ours, _ = ddim_step_with_logprob(scheduler, noise_pred, t, latents, eta, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # and with the noise handed in explicitly: the sampled step is mean + std * noise
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    expected = scheduler.step(noise_pred, t, latents, eta=eta, variance_noise=noise).prev_sample
    mean, std = reference_mean_std(scheduler, noise_pred, latents, t.item(), eta)
    torch.testing.assert_close(expected.double(), mean + std * noise.double(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("index", [0, 7, STEPS - 1])
def test_log_prob_is_the_gaussian_log_density_averaged_over_dimensions(scheduler, index, eta):
    t = scheduler.timesteps[index]
    noise_pred, latents = inputs(100 + index)
    next_latents, log_prob = ddim_step_with_logprob(scheduler, noise_pred, t, latents, eta,
                                                    generator=torch.Generator().manual_seed(1))
    mean, std = reference_mean_std(scheduler, noise_pred, latents, t.item(), eta)
    expected = Normal(mean, std).log_prob(next_latents.double()).mean(dim=(1, 2, 3))
    assert log_prob.shape == (SHAPE[0],)
    torch.testing.assert_close(log_prob.double(), expected, atol=1e-4, rtol=1e-5)
    # a step far from the mean is less likely than the sampled one
    _, far = ddim_step_with_logprob(scheduler, noise_pred, t, latents, eta, next_latents=next_latents + 3 * std.float())
    assert (far < log_prob).all()


def test_log_prob_of_a_given_step_and_the_step_is_returned_unchanged(scheduler):
    t = scheduler.timesteps[5]
    noise_pred, latents = inputs(3)
    mean, std = reference_mean_std(scheduler, noise_pred, latents, t.item(), 1.0)
    given = (mean + 0.5 * std).float()  # every dimension half a std from the mean
    returned, log_prob = ddim_step_with_logprob(scheduler, noise_pred, t, latents, 1.0, next_latents=given)
    assert returned is given
    expected = -0.125 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(log_prob.double(), expected.expand(SHAPE[0]), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_distinct_timesteps_in_one_batch_equal_per_sample_calls(scheduler, eta):
    timesteps = scheduler.timesteps[[0, 9, 19, 4]]  # 951, 501, 1, 751
    noise_pred, latents = inputs(5, shape=(4, 4, 8, 8))
    seeds = [11, 12, 13, 14]
    batched, batched_log_prob = ddim_step_with_logprob(
        scheduler, noise_pred, timesteps, latents, eta, generator=[torch.Generator().manual_seed(s) for s in seeds])
    given = batched + 0.1  # a step off the sampled one, as the training pass sees it
    _, given_log_prob = ddim_step_with_logprob(scheduler, noise_pred, timesteps, latents, eta, next_latents=given)
    for i, t in enumerate(timesteps):
        one, one_log_prob = ddim_step_with_logprob(scheduler, noise_pred[i:i + 1], t, latents[i:i + 1], eta,
                                                   generator=torch.Generator().manual_seed(seeds[i]))
        reference = scheduler.step(noise_pred[i:i + 1], t, latents[i:i + 1], eta=eta,
                                   generator=torch.Generator().manual_seed(seeds[i])).prev_sample
        torch.testing.assert_close(batched[i:i + 1], one, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(batched[i:i + 1], reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched_log_prob[i:i + 1], one_log_prob, atol=1e-6, rtol=1e-6)
        _, one_given = ddim_step_with_logprob(scheduler, noise_pred[i:i + 1], t, latents[i:i + 1], eta,
                                              next_latents=given[i:i + 1])
        torch.testing.assert_close(given_log_prob[i:i + 1], one_given, atol=1e-6, rtol=1e-6)
    # the four timesteps really have four different noise levels, so a mix-up would show
    assert len(set(round(x, 3) for x in batched_log_prob.tolist())) == 4
