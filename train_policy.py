"""Stage 4: DDPO: train a UNet LoRA by policy gradient to make images the reward model scores higher.

    python train_policy.py [--name=value ...]
    accelerate launch train_policy.py [...]         (several GPUs: each samples its share)

Reads   models/checkpoint/ (SD1.x or SDXL), models/reward_model.safetensors (trained on that family), and to
        resume the newest outputs/diffusers_lora_epoch_N.safetensors with outputs/optimizer_epoch_N.pt.
Writes  every train_save_freq epochs: outputs/diffusers_lora_epoch_N.safetensors (pipeline.load_lora_weights),
        outputs/ui_lora_epoch_N.safetensors (WebUI / ComfyUI), outputs/optimizer_epoch_N.pt and
        outputs/preview_epoch_N.png; every epoch: outputs/policy_metrics.jsonl and outputs/policy_metrics.png.
Rerun, it resumes after the newest saved epoch; earlier files are never deleted.

An epoch, as the seed's: sample train_sample_batch_size x train_sample_num_batches_per_epoch images,
score them, then backpropagate every image (train_policy_batch_size per forward/backward) at every
trained timestep, the gradients accumulating into train_optimizer_steps_per_epoch AdamW steps (1).
"""

import os
import time
from dataclasses import replace

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from utils.cli import UserError, images_per_epoch, run_stage, trained_timesteps, validate_settings
from utils.ddpo import compute_advantages, policy_gradient_backward
from utils.files import publish
from utils.lora import add_lora, latest_lora, load_lora_into_unet, save_lora
from utils.metrics import append_jsonl, contact_sheet, plot_curves, read_jsonl
from utils.reward_model import check_family, load_reward_model
from utils.sampling import (Denoiser, decode_latents, load_pipeline, model_family, prompt_conditioning,
                            sample_with_logprob, text_encoders)
from utils.training_calls import fit_training_calls, training_call_candidates

USED_SETTINGS = ["checkpoint_path", "reward_model_path", "lora_path", "lora_rank", "device", "attention_backend",
                 "prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "eta",
                 "train_policy_num_epochs", "train_save_freq", "train_sample_batch_size",
                 "train_sample_num_batches_per_epoch", "train_policy_batch_size", "train_optimizer_steps_per_epoch",
                 "train_policy_learning_rate", "train_adv_clip_max", "train_clip_range", "train_timestep_fraction",
                 "train_timesteps_per_call", "train_gradient_checkpointing", "train_offload_frozen", "train_compile",
                 "train_preview_seeds", "seed"]


def image_seeds(seed, epoch, count):
    """Seeds of the epoch's images: the same for any number of processes, so a run is reproducible."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randint(0, 2**31 - 1, (count,), generator=generator).tolist()


def sample_epoch(sampler, reward_model, seeds, batch_size, height, width, num_inference_steps, show_progress):
    """Sample the given seeds in batches; returns the epoch's record, each tensor with a leading (n,)."""
    records = []
    for start in tqdm(range(0, len(seeds), batch_size), desc="sampling", leave=False, disable=not show_progress):
        generators = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
        record = sample_with_logprob(sampler, generators, height, width, num_inference_steps)
        record["rewards"] = reward_model(record["latents"][:, -1])  # (b,): the CNN on x_0 directly, no VAE
        record["timesteps"] = record["timesteps"].expand(len(generators), -1)  # (b, steps)
        records.append(record)
    return {key: torch.cat([r[key] for r in records]) for key in records[0]}


def training_minibatches(samples, advantages, batch_size, timestep_fraction, generator):
    """Shuffle samples and, per sample, its timesteps (keeping trained_timesteps of them).

    Returns minibatches: latents/next_latents (b, k, 4, h/8, w/8), log_probs/timesteps (b, k), advantages (b,).
    """
    n, steps = samples["log_probs"].shape
    k = trained_timesteps(steps, timestep_fraction)
    order = torch.randperm(n, generator=generator)
    step_order = torch.stack([torch.randperm(steps, generator=generator)[:k] for _ in range(n)])  # (n, k)
    rows = torch.arange(n)[:, None]
    chosen = {
        "latents": samples["latents"][:, :-1][rows, step_order],
        "next_latents": samples["latents"][:, 1:][rows, step_order],
        "log_probs": samples["log_probs"][rows, step_order],
        "timesteps": samples["timesteps"][rows, step_order],
        "advantages": advantages,
    }
    return [{key: value[order[start:start + batch_size]] for key, value in chosen.items()}
            for start in range(0, n, batch_size)]


def train_epoch(accelerator, trainer, optimizer, minibatches, clip_range, timesteps_per_call, optimizer_steps,
                show_progress=False):
    """PPO over the minibatches, their gradients summed into `optimizer_steps` AdamW steps; returns mean stats."""
    trainer.unet.train()
    means = {"loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    per_step = len(minibatches) // optimizer_steps
    bar = tqdm(total=len(minibatches), desc="training", leave=False, disable=not show_progress)
    for first in range(0, len(minibatches), per_step):
        for index in range(first, first + per_step):
            stats = policy_gradient_backward(trainer, minibatches[index], clip_range, timesteps_per_call,
                                             backward=accelerator.backward,
                                             no_sync=lambda: accelerator.no_sync(trainer.unet),
                                             sync=index == first + per_step - 1)
            for key in means:
                means[key] += stats[key] / len(minibatches)
            bar.update()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    bar.close()
    return means


def run_epoch(settings, epoch, accelerator, sampler, trainer, optimizer, reward_model, training_call=None,
              after_sampling=lambda: None):
    """One epoch: SAMPLING, advantages over every process's rewards, TRAINING.

    `training_call` (checkpointing, timesteps per call) is fitted on this epoch's samples when None.
    `after_sampling` runs between the phases (the benchmark reads memory there).
    Returns {"rewards" (all images,), "stats", "training_call", "seconds", "cpu_seconds"} (per phase).
    """
    synchronize = torch.cuda.synchronize if accelerator.device.type == "cuda" else lambda: None
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    started = {name: clock() for name, clock in clocks.items()}

    # ---------------------------------------------------------------- SAMPLING
    rank, per_process = accelerator.process_index, images_per_epoch(settings) // accelerator.num_processes
    seeds = image_seeds(settings.seed, epoch, images_per_epoch(settings))[rank * per_process:(rank + 1) * per_process]
    sampler.unet.eval()
    samples = sample_epoch(sampler, reward_model, seeds, settings.train_sample_batch_size, settings.height,
                           settings.width, settings.num_inference_steps, accelerator.is_main_process)
    # Advantages are normalised over every process's rewards, as one process would over all images.
    all_rewards = accelerator.gather(samples["rewards"])  # (images_per_epoch,), in seed order
    advantages = compute_advantages(all_rewards, settings.train_adv_clip_max)[rank * per_process:(rank + 1) * per_process]
    synchronize()
    sampled = {name: clock() for name, clock in clocks.items()}
    after_sampling()

    # ---------------------------------------------------------------- TRAINING
    generator = torch.Generator().manual_seed(settings.seed * 7919 + epoch * 31 + rank)
    minibatches = training_minibatches(samples, advantages, settings.train_policy_batch_size,
                                       settings.train_timestep_fraction, generator)
    if training_call is None:
        candidates = training_call_candidates(settings.train_gradient_checkpointing, settings.train_timesteps_per_call,
                                              minibatches[0]["log_probs"].shape[1])
        training_call = fit_training_calls(accelerator, trainer, optimizer, minibatches[0], candidates,
                                           settings.train_clip_range)
    stats = train_epoch(accelerator, trainer, optimizer, minibatches, settings.train_clip_range, training_call[1],
                        settings.train_optimizer_steps_per_epoch, accelerator.is_main_process)
    # Each process trained on its share of the images: log the mean over all of them.
    stats = {key: accelerator.reduce(torch.tensor(value, device=accelerator.device), "mean").item()
             for key, value in stats.items()}
    synchronize()
    trained = {name: clock() for name, clock in clocks.items()}
    return {"rewards": all_rewards, "stats": stats, "training_call": training_call,
            "seconds": {"sampling": sampled["wall"] - started["wall"], "training": trained["wall"] - sampled["wall"]},
            "cpu_seconds": {"sampling": sampled["cpu"] - started["cpu"], "training": trained["cpu"] - sampled["cpu"]}}


def save_preview(path, pipeline, sampler, reward_model, seeds, epoch, height, width, num_inference_steps):
    """Fixed seeds without the LoRA and with it, each with its reward, so a person sees what the LoRA does."""
    latents = []
    for with_lora in (False, True):
        sampler.unet.enable_adapters() if with_lora else sampler.unet.disable_adapters()
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        latents.append(sample_with_logprob(sampler, generators, height, width, num_inference_steps)["latents"][:, -1])
    latents = torch.cat(latents)  # (2 x seeds, 4, h/8, w/8): the base model's row, then the LoRA's
    vae_home = pipeline.vae.device
    pipeline.vae.to(sampler.positive_embeds.device)
    images = decode_latents(pipeline, latents)
    pipeline.vae.to(vae_home)
    rewards = reward_model(latents).tolist()
    captions = [f"{'base' if i < len(seeds) else f'epoch {epoch}'}  seed {seeds[i % len(seeds)]}\nreward {r:+.2f}"
                for i, r in enumerate(rewards)]
    contact_sheet(path, images, captions, thumbnail=min(max(height, width, 128), 384), columns=len(seeds))


def preview_seeds(text):
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"train_preview_seeds must be whole numbers separated by commas (got {text!r}).") from None


def main(settings):
    use_cuda = settings.device.startswith("cuda")
    accelerator = Accelerator(mixed_precision="fp16" if use_cuda else "no", cpu=not use_cuda)
    validate_settings(settings, accelerator.num_processes)
    seeds_to_preview = preview_seeds(settings.train_preview_seeds)
    reward_model = load_reward_model(settings.reward_model_path, accelerator.device)
    set_seed(settings.seed)
    device = accelerator.device

    # ---------------------------------------------------------------- MODELS
    # Frozen weights in fp16 on the GPU (half the memory), LoRA in fp32; autocast + grad scaling via accelerate.
    pipeline = load_pipeline(settings.checkpoint_path, device, torch.float16 if use_cuda else torch.float32)
    family = model_family(pipeline)  # "sd15" or "sdxl": the reward model must know its latents, the export its names
    check_family(settings.reward_model_path, family, "the latents of checkpoint_path's model")
    unet = pipeline.unet
    if settings.attention_backend == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as error:
            raise UserError(f"attention_backend=xformers failed ({error}); install xformers or use sdpa.") from None
    lora_parameters = add_lora(unet, settings.lora_rank)
    conditioning = prompt_conditioning(pipeline, settings.prompt, settings.negative_prompt, settings.height,
                                       settings.width, device)
    if settings.train_offload_frozen:
        for encoder in text_encoders(pipeline):
            encoder.to("cpu")  # not needed again; the VAE only visits the GPU for previews
        pipeline.vae.to("cpu")
    pipeline.vae.enable_slicing()  # previews decode one image at a time: the same images in a fraction of the memory
    optimizer = torch.optim.AdamW(lora_parameters, lr=settings.train_policy_learning_rate)

    first_epoch = 1
    os.makedirs(settings.lora_path, exist_ok=True)
    resume_epoch, resume_path = latest_lora(settings.lora_path)
    if resume_path:
        load_lora_into_unet(unet, resume_path)
        optimizer_path = os.path.join(settings.lora_path, f"optimizer_epoch_{resume_epoch}.pt")
        if os.path.isfile(optimizer_path):
            optimizer.load_state_dict(torch.load(optimizer_path, map_location="cpu", weights_only=True))
            for group in optimizer.param_groups:  # load_state_dict restores the saved run's learning rate
                group["lr"] = settings.train_policy_learning_rate
        first_epoch = resume_epoch + 1
        accelerator.print(f"resuming from {resume_path}: epoch {first_epoch} of {settings.train_policy_num_epochs}")
    unet, optimizer = accelerator.prepare(unet, optimizer)
    # Sampling needs no gradient sync between processes: it calls the unwrapped UNet.
    sampler = Denoiser(accelerator.unwrap_model(unet), pipeline.scheduler, guidance_scale=settings.guidance_scale,
                       eta=settings.eta, **conditioning)
    trainer = replace(sampler, unet=torch.compile(unet) if settings.train_compile else unet)

    per_process = images_per_epoch(settings) // accelerator.num_processes
    minibatches = per_process // settings.train_policy_batch_size
    accelerator.print(
        f"{images_per_epoch(settings)} images per epoch ({settings.train_sample_num_batches_per_epoch} x "
        f"{settings.train_sample_batch_size}) on {accelerator.num_processes} process(es); per process "
        f"{minibatches} forward/backward passes of {settings.train_policy_batch_size} image(s) x "
        f"{trained_timesteps(settings.num_inference_steps, settings.train_timestep_fraction)} timesteps, "
        f"accumulated into {settings.train_optimizer_steps_per_epoch} optimizer step(s)")
    metrics_path = os.path.join(settings.lora_path, "policy_metrics.jsonl")
    run_started = time.strftime("%Y-%m-%d %H:%M:%S")  # in each metrics record: the plot marks where a run resumed
    training_call = None  # (gradient checkpointing, timesteps per UNet call), fitted on the first epoch's samples

    for epoch in range(first_epoch, settings.train_policy_num_epochs + 1):
        result = run_epoch(settings, epoch, accelerator, sampler, trainer, optimizer, reward_model, training_call)
        if training_call is None:
            training_call = result["training_call"]
            accelerator.print(
                f"training: {training_call[1]} timesteps per UNet call"
                f"{' (auto)' if not settings.train_timesteps_per_call else ''}, gradient checkpointing "
                f"{'on' if training_call[0] else 'off'}"
                f"{' (auto)' if settings.train_gradient_checkpointing == 'auto' else ''}")

        # ---------------------------------------------------------------- LOG and SAVE
        rewards, stats, seconds = result["rewards"], result["stats"], result["seconds"]
        metrics = {"run": run_started, "epoch": epoch, "reward_mean": rewards.mean().item(),
                   "reward_std": rewards.std(correction=0).item(), **stats,
                   "sampling_seconds": seconds["sampling"], "training_seconds": seconds["training"]}
        if accelerator.is_main_process:
            append_jsonl(metrics_path, metrics)
            plot_curves(os.path.join(settings.lora_path, "policy_metrics.png"), read_jsonl(metrics_path), "epoch",
                        [("reward of the epoch's images", [("reward_mean", "reward_std")]), ("PPO loss", ["loss"]),
                         ("seconds", ["sampling_seconds", "training_seconds"]),
                         ("share of clipped ratios", ["clipfrac"]), ("approx. KL to the sampling policy", ["approx_kl"])],
                        f"DDPO: {settings.prompt}")
        accelerator.print(
            f"epoch {epoch}: reward {metrics['reward_mean']:.4f} ± {metrics['reward_std']:.4f}, "
            f"loss {stats['loss']:.4g}, clipfrac {stats['clipfrac']:.3f}, kl {stats['approx_kl']:.2e}, "
            f"sampling {seconds['sampling']:.1f}s, training {seconds['training']:.1f}s")
        if epoch % settings.train_save_freq == 0 or epoch == settings.train_policy_num_epochs:
            if accelerator.is_main_process:
                paths = save_lora(sampler.unet, settings.lora_path, epoch, family)
                optimizer_path = os.path.join(settings.lora_path, f"optimizer_epoch_{epoch}.pt")
                torch.save(optimizer.state_dict(), optimizer_path + ".tmp")
                publish(optimizer_path + ".tmp", optimizer_path)
                saved = f"saved {paths[0]}, {paths[1]}"
                if seeds_to_preview:
                    preview = os.path.join(settings.lora_path, f"preview_epoch_{epoch}.png")
                    save_preview(preview, pipeline, sampler, reward_model, seeds_to_preview, epoch, settings.height,
                                 settings.width, settings.num_inference_steps)
                    saved += f", preview {preview}"
                accelerator.print(saved)
            accelerator.wait_for_everyone()
    if first_epoch > settings.train_policy_num_epochs:
        accelerator.print(f"nothing to do: epoch {resume_epoch} is saved and train_policy_num_epochs is "
                          f"{settings.train_policy_num_epochs}; raise it to train on.")


if __name__ == "__main__":
    run_stage(main, USED_SETTINGS)
