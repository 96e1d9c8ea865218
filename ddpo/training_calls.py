"""How training calls the UNet: timesteps per call and gradient checkpointing, the "auto" values resolved.

Candidates go fastest first: without checkpointing before with it (it adds a third to a step's
compute), and within each, all of an image's trained timesteps in one call, then halving
(20, 10, 5, 3, 2, 1). On CUDA each is tried with a real forward and backward until one fits in
memory. On CPU, where running out of memory means swapping rather than an error, the first is
taken: set both by hand to train SD1.5 on a CPU.
"""

import gc

import torch

from ddpo.errors import TrainingDoesNotFit
from ddpo.ppo import policy_gradient_backward


def halvings(most):
    """most, then halved (rounding up) down to 1: 20 -> [20, 10, 5, 3, 2, 1]."""
    counts = [most]
    while counts[-1] > 1:
        counts.append((counts[-1] + 1) // 2)
    return counts


def training_call_candidates(gradient_checkpointing, timesteps_per_call, trained_timesteps):
    """[(gradient checkpointing, timesteps per UNet call)] the two settings allow, fastest first."""
    checkpointing = [False, True] if gradient_checkpointing == "auto" else [gradient_checkpointing]
    per_call = halvings(trained_timesteps) if timesteps_per_call == 0 else [timesteps_per_call]
    return [(checkpoint, count) for checkpoint in checkpointing for count in per_call]


def first_that_fits(attempt, candidates, release_memory=None):
    """The first candidate for which `attempt(candidate)` runs without the GPU running out of memory.

    After a failure `release_memory()` (if given) returns what the attempt held. Raises
    torch.OutOfMemoryError if nothing fits.
    """
    for candidate in candidates:
        try:
            attempt(candidate)
            return candidate
        except torch.OutOfMemoryError:
            pass
        # Out here the exception is gone, and with it the failed attempt's frames and tensors.
        if release_memory:
            release_memory()
    raise torch.OutOfMemoryError(f"none of {candidates} fits in GPU memory")


def release_cuda_memory():
    gc.collect()
    torch.cuda.empty_cache()


def set_gradient_checkpointing(unet, on):
    unet.enable_gradient_checkpointing() if on else unet.disable_gradient_checkpointing()


def fit_training_calls(accelerator, trainer, optimizer, minibatch, candidates, clip_range, backward, kl=None):
    """The first of `candidates` whose training call fits, tried on `minibatch`: (checkpointing, per call).

    With `kl` (ddpo/kl.py KLToBase) the probe makes training's base-model calls too, so their memory counts.

    The probe's gradient is thrown away. Every process then takes the latest candidate any of them
    needed, so all make the same calls (identical GPUs find the same one; different ones may not
    agree on which is smallest, as checkpointing with 20 per call can need more than none with 1).
    Checkpointing is switched on the UNet as chosen.
    """
    model = accelerator.unwrap_model(trainer.unet)

    def attempt(candidate):
        checkpoint, count = candidate
        set_gradient_checkpointing(model, checkpoint)
        trainer.unet.train()
        try:
            with accelerator.no_sync(trainer.unet):
                policy_gradient_backward(trainer, minibatch, clip_range, count, backward, kl)
        finally:
            optimizer.zero_grad(set_to_none=True)

    if len(candidates) == 1 or accelerator.device.type != "cuda":
        choice = candidates[0]
    else:
        try:
            choice = first_that_fits(attempt, candidates, release_cuda_memory)
        except torch.OutOfMemoryError:
            checkpoint, count = candidates[-1]
            raise TrainingDoesNotFit(
                            f"training does not fit in GPU memory even with {count} timestep(s) per UNet call and "
                            f"gradient checkpointing {'on' if checkpoint else 'off'}: lower height/width or "
                            f"train_policy_batch_size, or set train_timesteps_per_call=0 and "
                            f"train_gradient_checkpointing=auto.") from None
        latest = accelerator.gather(torch.tensor([candidates.index(choice)], device=accelerator.device)).max()
        choice = candidates[int(latest)]
    set_gradient_checkpointing(model, choice[0])
    return choice
