"""Stage 4: DDPO: train a UNet LoRA by policy gradient to make images the reward model scores higher.

    python train_policy.py [--name=value ...]
    accelerate launch train_policy.py [...]         (several GPUs: each samples its share)

Reads   models/checkpoint/, models/reward_model.safetensors, and to resume the newest
        outputs/diffusers_lora_epoch_N.safetensors with outputs/optimizer_epoch_N.pt.
Writes  every train_save_freq epochs: outputs/diffusers_lora_epoch_N.safetensors (pipeline.load_lora_weights),
        outputs/ui_lora_epoch_N.safetensors (WebUI / ComfyUI), outputs/optimizer_epoch_N.pt and
        outputs/preview_epoch_N.png; every epoch: outputs/policy_metrics.jsonl and outputs/policy_metrics.png.
Rerun, it resumes after the newest saved epoch; earlier files are never deleted.
"""

import os
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from utils.cli import UserError, run_stage
from utils.ddpo import compute_advantages, first_that_fits, halvings, policy_gradient_backward
from utils.files import publish
from utils.lora import add_lora, latest_lora, load_lora_into_unet, save_lora
from utils.metrics import append_jsonl, contact_sheet, plot_curves, read_jsonl
from utils.reward_model import load_reward_model
from utils.sampling import decode_latents, encode_prompt, load_pipeline, sample_with_logprob

USED_SETTINGS = ["checkpoint_path", "reward_model_path", "lora_path", "lora_rank", "device", "attention_backend",
                 "prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "eta",
                 "train_policy_num_epochs", "train_save_freq", "train_sample_batch_size",
                 "train_sample_num_batches_per_epoch", "train_policy_batch_size", "train_policy_learning_rate",
                 "train_adv_clip_max", "train_clip_range", "train_timestep_fraction", "train_timesteps_per_call",
                 "train_gradient_checkpointing", "train_offload_frozen", "train_compile", "train_preview_seeds", "seed"]


def check_batch_arithmetic(settings, num_processes):
    samples_per_epoch = settings.train_sample_batch_size * settings.train_sample_num_batches_per_epoch
    if samples_per_epoch % (num_processes * settings.train_policy_batch_size):
        raise UserError(f"{samples_per_epoch} images per epoch do not split into {num_processes} processes x "
                        f"minibatches of train_policy_batch_size={settings.train_policy_batch_size}.")
    return samples_per_epoch


def image_seeds(settings, epoch, count):
    """Seeds of the epoch's images: the same for any number of processes, so a run is reproducible."""
    generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
    return torch.randint(0, 2**31 - 1, (count,), generator=generator).tolist()


def sample_epoch(settings, unet, scheduler, reward_model, embeds, seeds, position):
    """Sample the given seeds in batches; returns the epoch's record, each tensor with a leading (n,)."""
    records = []
    for start in tqdm(range(0, len(seeds), settings.train_sample_batch_size), desc="sampling", leave=False,
                      disable=position != 0):
        generators = [torch.Generator().manual_seed(s) for s in seeds[start:start + settings.train_sample_batch_size]]
        record = sample_with_logprob(unet, scheduler, *embeds, generators, settings.height, settings.width,
                                     settings.num_inference_steps, settings.guidance_scale, settings.eta, progress=False)
        record["rewards"] = reward_model(record["latents"][:, -1])  # (b,): the CNN on x_0 directly, no VAE
        record["timesteps"] = record["timesteps"].expand(len(generators), -1)  # (b, steps)
        records.append(record)
    return {key: torch.cat([r[key] for r in records]) for key in records[0]}


def training_minibatches(samples, advantages, settings, generator):
    """Shuffle samples and, per sample, its timesteps (keeping train_timestep_fraction of them).

    Yields minibatches: latents/next_latents (b, k, 4, h/8, w/8), log_probs/timesteps (b, k), advantages (b,).
    """
    n, steps = samples["log_probs"].shape
    k = max(1, int(steps * settings.train_timestep_fraction))
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
    for start in range(0, n, settings.train_policy_batch_size):
        index = order[start:start + settings.train_policy_batch_size]
        yield {key: value[index] for key, value in chosen.items()}


def training_call_candidates(settings, trained_timesteps):
    """[(gradient checkpointing, timesteps per UNet call)] the settings allow, fastest first."""
    checkpointing = [False, True] if settings.train_gradient_checkpointing == "auto" else \
        [settings.train_gradient_checkpointing]
    per_call = halvings(trained_timesteps) if settings.train_timesteps_per_call == 0 else \
        [settings.train_timesteps_per_call]
    return [(checkpoint, count) for checkpoint in checkpointing for count in per_call]


def set_gradient_checkpointing(unet, on):
    unet.enable_gradient_checkpointing() if on else unet.disable_gradient_checkpointing()


def fit_training_calls(settings, accelerator, unet, optimizer, scheduler, embeds, samples, advantages):
    """How training calls the UNet, the "auto" settings resolved: (gradient checkpointing, timesteps per call).

    Candidates (training_call_candidates) go fastest first: without checkpointing before with it
    (it adds a third to a step's compute), and within each, all of an image's trained timesteps in
    one call, then halving (20, 10, 5, 3, 2, 1). On CUDA each is tried with a real forward and
    backward of the epoch's first minibatch (the gradient is thrown away) until one fits in memory; every process
    then takes the latest candidate any of them needed, so all make the same calls (identical GPUs
    find the same one).
    On CPU, where running out of memory means swapping rather than an error, the first is taken:
    set both by hand to train SD1.5 on a CPU. Checkpointing is switched on the UNet as chosen.
    """
    minibatch = next(training_minibatches(samples, advantages, settings, torch.Generator().manual_seed(0)))
    candidates = training_call_candidates(settings, minibatch["log_probs"].shape[1])  # (b, k): k timesteps each
    model = accelerator.unwrap_model(unet)

    def attempt(candidate):
        checkpoint, count = candidate
        set_gradient_checkpointing(model, checkpoint)
        unet.train()
        try:
            with accelerator.no_sync(unet):
                policy_gradient_backward(unet, scheduler, minibatch, *embeds, settings.guidance_scale, settings.eta,
                                         settings.train_clip_range, count, backward=accelerator.backward)
        finally:
            optimizer.zero_grad(set_to_none=True)

    if len(candidates) == 1 or accelerator.device.type != "cuda":
        choice = candidates[0]
    else:
        try:
            choice = first_that_fits(attempt, candidates)
        except torch.OutOfMemoryError:
            raise UserError(f"training does not fit in GPU memory at {settings.height}x{settings.width} even with "
                            f"{candidates[-1][1]} timestep(s) per UNet call and gradient checkpointing "
                            f"{'on' if candidates[-1][0] else 'off'}: lower height/width or train_policy_batch_size, "
                            f"or set train_timesteps_per_call=0 and train_gradient_checkpointing=auto.") from None
        latest = accelerator.gather(torch.tensor([candidates.index(choice)], device=accelerator.device)).max()
        choice = candidates[int(latest)]
    set_gradient_checkpointing(model, choice[0])
    return choice


def train_epoch(settings, accelerator, unet, optimizer, scheduler, embeds, samples, advantages, generator,
                timesteps_per_call):
    """One PPO pass over this process's samples, an optimizer step per minibatch; returns the mean stats."""
    unet.train()
    totals = {"loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    minibatches = list(training_minibatches(samples, advantages, settings, generator))
    for minibatch in tqdm(minibatches, desc="training", leave=False, disable=not accelerator.is_main_process):
        stats = policy_gradient_backward(
            unet, scheduler, minibatch, *embeds, settings.guidance_scale, settings.eta, settings.train_clip_range,
            timesteps_per_call, backward=accelerator.backward, no_sync=lambda: accelerator.no_sync(unet))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for key in totals:
            totals[key] += stats[key] / len(minibatches)
    return totals


def save_preview(settings, pipeline, unet, embeds, reward_model, epoch, device):
    """Fixed seeds without the LoRA and with it, each with its reward, so a person sees what the LoRA does."""
    seeds = [int(s) for s in settings.train_preview_seeds.split(",") if s.strip()]
    if not seeds:
        return None
    latents = []
    for with_lora in (False, True):
        unet.enable_adapters() if with_lora else unet.disable_adapters()
        latents.append(sample_with_logprob(
            unet, pipeline.scheduler, *embeds, [torch.Generator().manual_seed(s) for s in seeds], settings.height,
            settings.width, settings.num_inference_steps, settings.guidance_scale, settings.eta, progress=False,
        )["latents"][:, -1])
    latents = torch.cat(latents)  # (2 x seeds, 4, h/8, w/8): the base model's row, then the LoRA's
    vae_home = pipeline.vae.device
    pipeline.vae.to(device)
    images = decode_latents(pipeline, latents)
    pipeline.vae.to(vae_home)
    rewards = reward_model(latents).tolist()
    captions = [f"{'base' if i < len(seeds) else f'epoch {epoch}'}  seed {seeds[i % len(seeds)]}\nreward {r:+.2f}"
                for i, r in enumerate(rewards)]
    path = os.path.join(settings.lora_path, f"preview_epoch_{epoch}.png")
    contact_sheet(path, images, captions, thumbnail=min(max(settings.height, settings.width, 128), 384),
                  columns=len(seeds))
    return path


def main(settings):
    use_cuda = settings.device.startswith("cuda")
    accelerator = Accelerator(mixed_precision="fp16" if use_cuda else "no", cpu=not use_cuda)
    samples_per_epoch = check_batch_arithmetic(settings, accelerator.num_processes)
    if not os.path.isfile(settings.reward_model_path):
        raise UserError(f"no reward model at {settings.reward_model_path}: train one first with `python train_reward.py`.")
    set_seed(settings.seed)
    device, say = accelerator.device, accelerator.print

    # ---------------------------------------------------------------- MODELS
    # Frozen weights in fp16 on the GPU (half the memory), LoRA in fp32; autocast + grad scaling via accelerate.
    pipeline = load_pipeline(settings.checkpoint_path, device, torch.float16 if use_cuda else torch.float32)
    unet = pipeline.unet
    if settings.attention_backend == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as error:
            raise UserError(f"attention_backend=xformers failed ({error}); install xformers or use sdpa.") from None
    lora_parameters = add_lora(unet, settings.lora_rank)
    embeds = encode_prompt(pipeline, settings.prompt, settings.negative_prompt, device)  # 2 x (1, 77, dim)
    if settings.train_offload_frozen:
        pipeline.text_encoder.to("cpu")  # not needed again; the VAE only visits the GPU for previews
        pipeline.vae.to("cpu")
    pipeline.vae.enable_slicing()  # previews decode one image at a time: the same images in a fraction of the memory
    reward_model = load_reward_model(settings.reward_model_path, device)
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
        say(f"resuming from {resume_path}: epoch {first_epoch} of {settings.train_policy_num_epochs}")
    unet, optimizer = accelerator.prepare(unet, optimizer)
    sampler_unet = accelerator.unwrap_model(unet)  # sampling needs no gradient sync between processes
    if settings.train_compile:
        unet = torch.compile(unet)

    per_process = samples_per_epoch // accelerator.num_processes
    say(f"{samples_per_epoch} images per epoch ({settings.train_sample_num_batches_per_epoch} x "
        f"{settings.train_sample_batch_size}) on {accelerator.num_processes} process(es), "
        f"{per_process // settings.train_policy_batch_size} optimizer steps of {settings.train_policy_batch_size} "
        f"image(s) each per process, {max(1, int(settings.num_inference_steps * settings.train_timestep_fraction))} "
        f"timesteps per image")
    metrics_path = os.path.join(settings.lora_path, "policy_metrics.jsonl")
    run_started = time.strftime("%Y-%m-%d %H:%M:%S")  # in each metrics record: the plot marks where a run resumed
    timesteps_per_call = None  # chosen on the first epoch's samples, with gradient checkpointing

    for epoch in range(first_epoch, settings.train_policy_num_epochs + 1):
        # ---------------------------------------------------------------- SAMPLING
        started = time.perf_counter()
        sampler_unet.eval()
        rank = accelerator.process_index
        seeds = image_seeds(settings, epoch, samples_per_epoch)[rank * per_process:(rank + 1) * per_process]
        samples = sample_epoch(settings, sampler_unet, pipeline.scheduler, reward_model, embeds, seeds, rank)
        # Advantages are normalised over every process's rewards, as one process would over all images.
        all_rewards = accelerator.gather(samples["rewards"])  # (samples_per_epoch,), in seed order
        advantages = compute_advantages(all_rewards, settings.train_adv_clip_max)
        advantages = advantages[rank * per_process:(rank + 1) * per_process]
        sampling_seconds = time.perf_counter() - started

        # ---------------------------------------------------------------- TRAINING
        started = time.perf_counter()
        if timesteps_per_call is None:
            checkpointing, timesteps_per_call = fit_training_calls(settings, accelerator, unet, optimizer,
                                                                   pipeline.scheduler, embeds, samples, advantages)
            say(f"training: {timesteps_per_call} timesteps per UNet call"
                f"{' (auto)' if not settings.train_timesteps_per_call else ''}, gradient checkpointing "
                f"{'on' if checkpointing else 'off'}{' (auto)' if settings.train_gradient_checkpointing == 'auto' else ''}")
        totals = train_epoch(settings, accelerator, unet, optimizer, pipeline.scheduler, embeds, samples, advantages,
                             torch.Generator().manual_seed(settings.seed * 7919 + epoch * 31 + rank),
                             timesteps_per_call)
        # Each process trained on its share of the images: log the mean over all of them.
        totals = {key: accelerator.reduce(torch.tensor(value, device=device), "mean").item()
                  for key, value in totals.items()}
        training_seconds = time.perf_counter() - started

        # ---------------------------------------------------------------- LOG and SAVE
        record = {"run": run_started, "epoch": epoch, "reward_mean": all_rewards.mean().item(),
                  "reward_std": all_rewards.std(correction=0).item(), **totals,
                  "sampling_seconds": sampling_seconds, "training_seconds": training_seconds}
        if accelerator.is_main_process:
            append_jsonl(metrics_path, record)
            plot_curves(os.path.join(settings.lora_path, "policy_metrics.png"), read_jsonl(metrics_path), "epoch",
                        [("reward of the epoch's images", [("reward_mean", "reward_std")]), ("PPO loss", ["loss"]),
                         ("seconds", ["sampling_seconds", "training_seconds"]),
                         ("share of clipped ratios", ["clipfrac"]), ("approx. KL to the sampling policy", ["approx_kl"])],
                        f"DDPO: {settings.prompt}")
        say(f"epoch {epoch}: reward {record['reward_mean']:.4f} ± {record['reward_std']:.4f}, loss {totals['loss']:.4g}, "
            f"clipfrac {totals['clipfrac']:.3f}, kl {totals['approx_kl']:.2e}, "
            f"sampling {sampling_seconds:.1f}s, training {training_seconds:.1f}s")
        if epoch % settings.train_save_freq == 0 or epoch == settings.train_policy_num_epochs:
            if accelerator.is_main_process:
                paths = save_lora(sampler_unet, settings.lora_path, epoch)
                optimizer_path = os.path.join(settings.lora_path, f"optimizer_epoch_{epoch}.pt")
                torch.save(optimizer.state_dict(), optimizer_path + ".tmp")
                publish(optimizer_path + ".tmp", optimizer_path)
                preview = save_preview(settings, pipeline, sampler_unet, embeds, reward_model, epoch, device)
                say(f"saved {paths[0]}, {paths[1]}" + (f", preview {preview}" if preview else ""))
            accelerator.wait_for_everyone()
    if first_epoch > settings.train_policy_num_epochs:
        say(f"nothing to do: epoch {resume_epoch} is saved and train_policy_num_epochs is "
            f"{settings.train_policy_num_epochs}; raise it to train on.")


if __name__ == "__main__":
    run_stage(main, USED_SETTINGS)
