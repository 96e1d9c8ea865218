"""The method, tensors in and out: read these files top to bottom and you have DDPO for Stable Diffusion.

    ddim.py            one DDIM step with the log-probability of the step taken
    sampling.py        the guided UNet (Denoiser) and the sampling loop that records every step
    ppo.py             advantages and the clipped surrogate, backpropagated per timestep
    precision.py       mixed precision: autocast, per-minibatch fp16 loss scaling
    training_calls.py  timesteps per UNet call and gradient checkpointing, fitted to memory
    lora.py            the UNet LoRA and its keys in kohya's format (WebUI, ComfyUI)
    reward_model.py    the latent CNN and its ensemble
    reward_training.py the reward model's losses and fit
    rating_order.py    which images and pairs to rate next
    statistics.py      Pearson, Spearman, pairwise accuracy

It imports only torch, diffusers, peft, numpy and itself: no files, no settings, no command line.
"""
