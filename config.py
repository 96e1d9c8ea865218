"""Every setting of AlmostPerfect, with its default.

Edit the values here, or override any of them on a stage's command line as --name=value
(e.g. `python generate.py --generate_sample_size=100 --prompt="a red car"`). An override is
checked against the default's type; an unknown name is an error that suggests the closest
ones. `python <stage>.py --help` lists the settings that stage uses, with their values.
The parser and the checks that settings agree with each other are in utils/cli.py.
"""

import torch

# ---------------------------------------------------------------- paths
sample_path = "samples/"  # the current round: <seed>.png, latents/, scores.json; history/ holds earlier rounds
score_path = "samples/scores.json"  # {"<seed>.png": score in -5..+5}, the original WebApp's format
comparison_path = "samples/comparisons.json"  # [{"a": "<seed>.png", "b": "<seed>.png", "winner": "a"|"b"|"tie"}]
model_path = "models/"  # reward model and its metrics are written here
checkpoint_path = "models/checkpoint"  # SD1.x or SDXL: a diffusers folder or one WebUI/ComfyUI .safetensors/.ckpt
checkpoint_config = ""  # a diffusers folder whose configs load a single-file checkpoint ("" = utils/configs/)
reward_model_path = "models/reward_model.safetensors"  # latent CNN weights, metadata in the file's header
lora_path = "outputs/"  # LoRAs (diffusers and WebUI/kohya format), optimizer state, metrics, plots
lora_name_prefix = ""  # before every LoRA file name (e.g. "neon_"), so two runs can share one WebUI models/Lora/

# ---------------------------------------------------------------- model
lora_rank = 32  # rank r of the UNet LoRA; lora_alpha = r, so WebUI applies it at scale 1
device = "cuda" if torch.cuda.is_available() else "cpu"
mixed_precision = "auto"  # "fp16" (upstream's; auto on cuda), "bf16" (no overflow, Ampere+), "no" (fp32; auto on cpu)
attention_backend = "sdpa"  # "sdpa" (PyTorch's fused attention) or "xformers" (if installed)

# ---------------------------------------------------------------- generation (stage 1, and the policy's sampler)
generate_sample_size = 1000  # images per round
generate_batch_size = 4  # images per pipeline call; raise it until memory runs out
generate_lora = "latest"  # "latest" = newest outputs/diffusers_lora_epoch_N.safetensors, "none", or a file path
generate_vae_slicing = True  # decode a batch one image at a time: same images, a fraction of the VAE's memory
generate_vae_tiling = False  # decode in tiles: needed only far above 1024 px on small GPUs; may show faint seams
prompt = "a neon sign"
prompt_file = ""  # one prompt per line, {a|b|c} variants, # comments (utils/prompts.py); "" = the single prompt above
negative_prompt = "worst quality, low quality"
height = 1080  # pixels, a multiple of 8 (latents are height/8 x width/8)
width = 720  # pixels, a multiple of 8
num_inference_steps = 20  # DDIM steps per image
guidance_scale = 5.0  # classifier-free guidance; 1 turns it off
eta = 1.0  # DDIM noise (0 = deterministic); DDPO needs eta > 0 for its log-probabilities

# ---------------------------------------------------------------- rating page (stage 2)
score_host = "127.0.0.1"  # anything but loopback lets your network see and change your ratings
score_port = 7870  # if taken, any free port is used (0 = always any free port); not 7860, which is WebUI's
score_open_browser = True  # open the page in the default browser at start

# ---------------------------------------------------------------- reward model (stage 3)
train_reward_recipe = "upstream"  # or "few_ratings": ranking loss, batches of 32, 3e-3; better below ~1000 ratings
train_reward_num_epochs = 10
train_reward_batch_size = 100  # ratings per AdamW step
train_reward_test_split_ratio = 0.1  # share of ratings held out to measure the model; each CNN holds out another
train_reward_learning_rate = 1e-3  # AdamW
train_reward_use_history = True  # also learn from rated rounds in samples/history/
train_reward_flip_augment = True  # random horizontal flips of training latents (a mirrored image is rated the same)
train_reward_loss = "mse"  # on scores: "mse" (upstream's) or "ranking" (pairwise logistic: only their order counts)
train_reward_ensemble_size = 4  # CNNs from different random starts; reward = their mean; 1 = upstream's single CNN
train_reward_min_correlation = 0.3  # below this test-set Pearson correlation, warn that the model is not worth a policy
rank_folder = ""  # a folder of images: train_reward.py ranks it with the trained model (best first) instead of training

# ---------------------------------------------------------------- policy, DDPO (stage 4)
train_policy_num_epochs = 50  # the run stops at this epoch number, counting epochs of earlier (resumed) runs
train_save_freq = 10  # save LoRA + optimizer state every N epochs (and after the last)
train_sample_batch_size = 4  # images per sampling call
train_sample_num_batches_per_epoch = 4  # sampling calls per epoch: an epoch learns from batch_size x num_batches images
train_policy_batch_size = 1  # images per UNet forward/backward (a memory knob, as upstream); gradients accumulate
train_optimizer_steps_per_epoch = 1  # AdamW steps per epoch, each on an equal share of its images; 1 = upstream's
train_policy_learning_rate = 1e-4  # AdamW on the LoRA weights
# An epoch draws (its images / train_images_per_prompt) prompts of prompt_file, train_images_per_prompt images each.
train_images_per_prompt = 0  # 0 = all of the epoch's images: one prompt per epoch, as upstream
train_advantage_baseline = "epoch"  # reward minus the "epoch"'s mean (upstream's) or its "prompt" group's, / epoch std
train_adv_clip_max = 2.0  # advantages (normalised rewards) are clipped to +-this
train_clip_range = 1e-4  # PPO ratio clip range
train_kl_weight = 0.0  # + this x the LoRA's KL to the base model (logged every epoch) per timestep; 0 = upstream
train_kl_fraction = 0.25  # share of each epoch's images the KL to the base model is measured on (0 = not measured)
train_reward_pessimism = 0.0  # maximise the ensemble's mean - this x its CNNs' std (where they disagree); 0 = the mean
train_timestep_fraction = 1.0  # train on this random share of each image's timesteps (1.0 = all, as upstream)
train_timesteps_per_call = 0  # timesteps per UNet call in training (same gradient); 0 = auto: as many as fit
train_gradient_checkpointing = "auto"  # recompute activations: 1/4 the memory, +1/3 compute; auto = only if needed
train_offload_frozen = True  # keep text encoder and VAE off the GPU while training (they are not needed there)
train_compile = False  # torch.compile the UNet (slow first epoch, faster later ones)
train_preview_seeds = "0,1,2,3"  # fixed seeds of the preview grid written at each save ("" = no previews)
train_preview_prompts = ""  # ";"-separated; "" = prompt, or prompt_file's first two lines and one not in the file
seed = 0  # seeds the policy's sampling noise and shuffles, so a run (and its resume) is reproducible
