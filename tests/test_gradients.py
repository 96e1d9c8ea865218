"""The LoRA gets the same gradient however a training step is computed: one timestep per UNet call,
several, all at once, or with gradient checkpointing. The auto settings take the fastest training
call that fits in GPU memory. And train_timestep_fraction trains each image
on exactly int(steps * fraction) distinct timesteps of its own trajectory.
"""

import copy
from dataclasses import replace

import pytest
import torch

from conftest import tiny_denoiser
from ddpo.ppo import policy_gradient_backward
from ddpo.sampling import sample_with_logprob
from ddpo.training_calls import first_that_fits, halvings, training_call_candidates
from train_policy import training_minibatches

STEPS, GUIDANCE, ETA, CLIP_RANGE = 4, 5.0, 1.0, 1e-4


@pytest.fixture(scope="module")
def policy():
    """(Denoiser of a UNet with a LoRA, one minibatch of 2 images x all their timesteps, shuffled)."""
    denoiser = tiny_denoiser(GUIDANCE, ETA)
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    samples = sample_with_logprob(denoiser, generators, 64, 64, STEPS)
    samples["timesteps"] = samples["timesteps"].expand(2, -1)  # (2, steps), as train_policy's sample_epoch has it
    advantages = torch.tensor([1.0, -0.5])
    minibatch = training_minibatches(samples, advantages, 2, 1.0, torch.Generator().manual_seed(0))[0]
    denoiser.unet.train()
    return denoiser, minibatch


def lora_gradient(denoiser, minibatch, timesteps_per_call):
    denoiser.unet.zero_grad(set_to_none=True)
    policy_gradient_backward(denoiser, minibatch, CLIP_RANGE, timesteps_per_call)
    return torch.cat([p.grad.flatten() for p in denoiser.unet.parameters() if p.requires_grad])


def assert_same_gradient(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.fixture(scope="module")
def one_at_a_time(policy):
    gradient = lora_gradient(*policy, timesteps_per_call=1)
    assert all(p.grad.abs().max() > 0 for p in policy[0].unet.parameters() if p.requires_grad), \
        "the test needs a gradient on every LoRA matrix"
    return gradient


@pytest.mark.parametrize("timesteps_per_call", [2, 3, STEPS])  # 3: calls of 3 and 1 timesteps
def test_timesteps_per_call_gives_the_same_gradient(policy, one_at_a_time, timesteps_per_call):
    assert_same_gradient(lora_gradient(*policy, timesteps_per_call=timesteps_per_call), one_at_a_time)


@pytest.mark.parametrize("timesteps_per_call", [1, STEPS])
def test_gradient_checkpointing_gives_the_same_gradient(policy, one_at_a_time, timesteps_per_call,
                                                        checkpoint_recomputations):
    denoiser, minibatch = policy
    checkpointed = replace(denoiser, unet=copy.deepcopy(denoiser.unet))
    checkpointed.unet.enable_gradient_checkpointing()
    assert_same_gradient(lora_gradient(checkpointed, minibatch, timesteps_per_call=timesteps_per_call), one_at_a_time)
    assert checkpoint_recomputations, "diffusers did not checkpoint any block"


def gpu_with_room_for(room, tried):
    """An attempt that fails as CUDA does (torch.OutOfMemoryError) when a call needs more than `room`:
    4 units per timestep without checkpointing, 1 with it."""
    def attempt(candidate):
        tried.append(candidate)
        checkpointing, per_call = candidate
        if per_call * (1 if checkpointing else 4) > room:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return attempt


AUTO = ("auto", 0)  # train_gradient_checkpointing, train_timesteps_per_call


def test_auto_settings_try_without_checkpointing_first_then_halve_the_timesteps_per_call():
    assert halvings(20) == [20, 10, 5, 3, 2, 1] and halvings(1) == [1]
    assert training_call_candidates(*AUTO, 20) == [(False, n) for n in halvings(20)] + [(True, n) for n in halvings(20)]
    assert training_call_candidates(True, 4, 20) == [(True, 4)]


@pytest.mark.parametrize("room, chosen", [(80, (False, 20)), (20, (False, 5)), (4, (False, 1)), (3, (True, 3)),
                                          (1, (True, 1))])
def test_auto_settings_take_the_first_candidate_that_fits_in_memory(room, chosen):
    candidates, tried = training_call_candidates(*AUTO, 20), []
    assert first_that_fits(gpu_with_room_for(room, tried), candidates) == chosen
    assert tried == candidates[:candidates.index(chosen) + 1]  # nothing after the first that fits is tried


def test_auto_settings_give_up_when_nothing_fits():
    tried = []
    with pytest.raises(torch.OutOfMemoryError):
        first_that_fits(gpu_with_room_for(0, tried), training_call_candidates(*AUTO, 4))
    assert len(tried) == 6  # (off, 4), (off, 2), (off, 1), (on, 4), (on, 2), (on, 1)


def test_timestep_fraction_trains_on_that_many_distinct_timesteps_of_each_image():
    n, steps, fraction = 3, 20, 0.3
    latents = torch.arange(n * (steps + 1), dtype=torch.float32).view(n, steps + 1, 1, 1, 1).expand(-1, -1, 4, 2, 2)
    samples = {"latents": latents, "log_probs": latents[:, 1:, 0, 0, 0] * 10,  # (n, steps), traceable values
               "timesteps": torch.arange(steps, 0, -1).expand(n, -1) * 50}
    minibatches = training_minibatches(samples, torch.zeros(n), 1, fraction, torch.Generator().manual_seed(0))
    assert len(minibatches) == n
    seen = set()
    for minibatch in minibatches:
        x_t = minibatch["latents"][0, :, 0, 0, 0]  # (k,): the values identify image and step
        image, step = x_t.long() // (steps + 1), x_t.long() % (steps + 1)
        assert len(x_t) == int(steps * fraction) and len(set(step.tolist())) == len(x_t)
        assert (image == image[0]).all() and not (step == steps).any()  # its own trajectory; x_0 never as x_t
        torch.testing.assert_close(minibatch["next_latents"][0, :, 0, 0, 0], x_t + 1)  # the step the sampler took
        torch.testing.assert_close(minibatch["log_probs"][0], (x_t + 1) * 10)
        torch.testing.assert_close(minibatch["timesteps"][0], (steps - step) * 50)
        seen.add(image[0].item())
    assert seen == set(range(n))
