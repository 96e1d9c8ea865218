"""One epoch of train_policy's update against upstream's training loop, transcribed here as the reference.

The seed (original AlmostPerfect, train_policy.py) trains like this, for every minibatch of
train_policy_batch_size images, in order, and every timestep j:

    noise_pred = unet(cat([x_j] * 2), cat([t_j] * 2), cat([negative, positive]))  -> CFG
    log_prob   = DDIM log-density of the recorded x_{j+1} given x_j
    ratio      = exp(log_prob - logp_old_j);  advantages clamped to +-adv_clip_max
    loss       = mean(maximum(-adv * ratio, -adv * clamp(ratio, 1 - clip, 1 + clip)));  loss.backward()

and then ONE optimizer step for the whole epoch. The reference below is that loop, with its own
DDIM log-density, one UNet call per timestep, fp32 on CPU. train_policy's epoch must give the same
LoRA weights: by default, with several timesteps per UNet call, with gradient checkpointing and
(against the reference stepping k times) with k optimizer steps per epoch. SGD pins the loss's
scale (its update is lr x gradient); AdamW, train_policy's optimizer, pins the schedule (its first
updates are about lr x sign(gradient) per step, whatever the scale).
"""

import copy
import math
from dataclasses import replace

import pytest
import torch

from conftest import tiny_denoiser
from ddpo.ppo import compute_advantages
from ddpo.precision import MixedPrecision
from ddpo.sampling import sample_with_logprob
from train_policy import train_epoch, training_minibatches

IMAGES, STEPS, GUIDANCE, ETA = 16, 3, 5.0, 1.0  # upstream's 16 images per epoch (4 x 4), few DDIM steps
CLIP_RANGE, ADV_CLIP_MAX = 1e-4, 2.0  # upstream's defaults
SHUFFLE_SEED = 11
OPTIMIZERS = {"sgd": lambda params: torch.optim.SGD(params, lr=1e-2),
              "adamw": lambda params: torch.optim.AdamW(params, lr=1e-4)}  # upstream's lr


@pytest.fixture(scope="module")
def epoch():
    """(Denoiser of a UNet with a LoRA, the epoch's samples, its rewards), as train_policy has them."""
    denoiser = tiny_denoiser(GUIDANCE, ETA)
    samples = sample_with_logprob(denoiser, [torch.Generator().manual_seed(s) for s in range(IMAGES)], 64, 64, STEPS)
    samples["timesteps"] = samples["timesteps"].expand(IMAGES, -1)  # (n, steps)
    rewards = torch.randn(IMAGES, generator=torch.Generator().manual_seed(1)) * 3  # some advantages get clipped
    return denoiser, samples, rewards


def seed_log_prob(scheduler, noise_pred, t, latents, next_latents, eta):
    """The seed's ddim_step_with_logprob for a known next latent: log N(x_{t-1}; mean, std²), mean over dims."""
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t = scheduler.alphas_cumprod[t]
    alpha_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    pred_original = (latents - (1 - alpha_t) ** 0.5 * noise_pred) / alpha_t**0.5
    std = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)) ** 0.5
    mean = alpha_prev**0.5 * pred_original + (1 - alpha_prev - std**2) ** 0.5 * noise_pred
    log_prob = -((next_latents - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=(1, 2, 3))


def seed_epoch(denoiser, samples, rewards, batch_size, optimizer, steps_per_epoch, order):
    """The seed's training loop over images in `order`, stepping every len(minibatches) / steps_per_epoch."""
    unet, scheduler = denoiser.unet, denoiser.scheduler
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-8)  # upstream's normalisation
    minibatches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    unet.train()
    for m, images in enumerate(minibatches):
        b = len(images)
        embeds = torch.cat([denoiser.negative_embeds.expand(b, -1, -1), denoiser.positive_embeds.expand(b, -1, -1)])
        for j in range(samples["log_probs"].shape[1]):
            latents, t = samples["latents"][images, j], samples["timesteps"][images, j]
            noise_pred = unet(torch.cat([latents] * 2), torch.cat([t] * 2), embeds).sample
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + denoiser.guidance_scale * (noise_pred_text - noise_pred_uncond)
            log_prob = seed_log_prob(scheduler, noise_pred, int(t[0]), latents, samples["latents"][images, j + 1],
                                     denoiser.eta)
            clipped_advantages = torch.clamp(advantages[images], -ADV_CLIP_MAX, ADV_CLIP_MAX)
            ratio = torch.exp(log_prob - samples["log_probs"][images, j])
            unclipped_loss = -clipped_advantages * ratio
            clipped_loss = -clipped_advantages * torch.clamp(ratio, 1.0 - CLIP_RANGE, 1.0 + CLIP_RANGE)
            loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
            loss.backward()
        if (m + 1) % (len(minibatches) // steps_per_epoch) == 0:
            optimizer.step()
            optimizer.zero_grad()


def lora_weights(unet):
    return torch.cat([p.detach().flatten() for p in unet.parameters() if p.requires_grad])


def fresh(denoiser, checkpointing=False):
    """A copy of the denoiser with its own UNet (and LoRA), so every run starts from the same weights."""
    copied = replace(denoiser, unet=copy.deepcopy(denoiser.unet))
    if checkpointing:
        copied.unet.enable_gradient_checkpointing()
    return copied


def ours(denoiser, samples, rewards, optimizer_name, batch_size, timesteps_per_call, steps_per_epoch,
         checkpointing=False):
    trainer = fresh(denoiser, checkpointing)
    optimizer = OPTIMIZERS[optimizer_name]([p for p in trainer.unet.parameters() if p.requires_grad])
    minibatches = training_minibatches(samples, compute_advantages(rewards, ADV_CLIP_MAX), batch_size, 1.0,
                                       torch.Generator().manual_seed(SHUFFLE_SEED))
    train_epoch(trainer, optimizer, minibatches, CLIP_RANGE, timesteps_per_call, steps_per_epoch,
                MixedPrecision.create("no", "cpu"))
    return lora_weights(trainer.unet)


def reference(denoiser, samples, rewards, optimizer_name, batch_size, steps_per_epoch):
    model = fresh(denoiser)
    optimizer = OPTIMIZERS[optimizer_name]([p for p in model.unet.parameters() if p.requires_grad])
    # train_policy takes the images in the order of its generator's first randperm; the seed in file order
    # (the same sum of gradients when there is one step per epoch).
    order = torch.randperm(IMAGES, generator=torch.Generator().manual_seed(SHUFFLE_SEED))
    seed_epoch(model, samples, rewards, batch_size, optimizer, steps_per_epoch, order)
    return lora_weights(model.unet)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("batch_size, timesteps_per_call, steps_per_epoch, checkpointing", [
    (1, 1, 1, False),  # the defaults: upstream's loop exactly
    (2, 2, 1, False),  # several images and timesteps per UNet call (calls of 2 and 1 timesteps)
    (1, STEPS, 1, True),  # gradient checkpointing, all timesteps in one call
    (2, 1, 4, False),  # 4 optimizer steps per epoch, against the reference stepping 4 times
])
def test_an_epoch_gives_the_seeds_lora_weights(epoch, optimizer_name, batch_size, timesteps_per_call,
                                               steps_per_epoch, checkpointing):
    denoiser, samples, rewards = epoch
    expected = reference(denoiser, samples, rewards, optimizer_name, batch_size, steps_per_epoch)
    actual = ours(denoiser, samples, rewards, optimizer_name, batch_size, timesteps_per_call, steps_per_epoch,
                  checkpointing)
    initial = lora_weights(denoiser.unet)
    update = (expected - initial).abs().max().item()
    assert update > 1e-6, "the reference epoch must move the LoRA for the comparison to mean anything"
    # AdamW's update is about lr x g / (|g| + eps): where g is about 0, summation order alone moves it, so
    # its tolerance is a fifth of a step; a wrong schedule moves weights by whole steps.
    tolerance = update * (1e-3 if optimizer_name == "sgd" else 0.2)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=tolerance)
