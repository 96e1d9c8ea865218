"""Stage 4: DDPO: train a UNet LoRA by policy gradient to make images the reward model scores higher.

    python train_policy.py [--name=value ...]
    accelerate launch train_policy.py [...]         (several GPUs: each samples its share)

Reads   models/checkpoint (SD1.x or SDXL, a diffusers folder or a WebUI/ComfyUI file), models/reward_model.safetensors
        (trained on that family),
        and to resume outputs/resume_state.pt or the newest outputs/diffusers_lora_epoch_N.safetensors.
Writes  every train_save_freq epochs: outputs/ui_lora_epoch_N.safetensors (WebUI / ComfyUI) with its card
        ui_lora_epoch_N.preview.png, outputs/optimizer_epoch_N.pt, outputs/preview_epoch_N.png and, last,
        outputs/diffusers_lora_epoch_N.safetensors (pipeline.load_lora_weights); every epoch:
        outputs/policy_metrics.jsonl, outputs/policy_metrics.png and outputs/resume_state.pt.
        Each name starts with lora_name_prefix.
Rerun, it resumes after the newest finished epoch (a kill loses at most one); nothing saved is deleted.

An epoch, as upstream's: sample train_sample_batch_size x train_sample_num_batches_per_epoch images,
score them, then backpropagate every image (train_policy_batch_size per forward/backward) at every
trained timestep, the gradients accumulating into train_optimizer_steps_per_epoch AdamW steps (1).
"""

import math
import os
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ddpo.kl import KLToBase, measured_steps, trajectory_kl_to_base
from ddpo.lora import add_lora
from ddpo.ppo import compute_advantages, policy_gradient_backward
from ddpo.precision import MixedPrecision, gradients_are_finite, resolve_mixed_precision
from ddpo.reward_model import member_scores, pessimistic_reward
from ddpo.sampling import PROMPT_KEYS, Denoiser, sample_with_logprob, with_prompts
from ddpo.training_calls import fit_training_calls, training_call_candidates
from utils.checkpoint import model_family
from utils.cli import images_per_epoch, images_per_prompt, run_stage, seed_list, trained_timesteps, validate_settings
from utils.conditioning import PromptSet, pipeline_encoder
from utils.errors import UserError
from utils.files import crash_point
from utils.locks import folder_lock
from utils.lora_files import check_names_fit, epoch_files, lora_metadata, save_lora, save_lora_card
from utils.metrics import append_jsonl, contact_sheet, plot_curves, read_jsonl
from utils.pipeline import decode_latents, load_pipeline
from utils.prompts import preview_prompts, prompt_lines, prompt_summary
from utils.reward_files import check_family, load_reward_model
from utils.run_state import STATE_FILE, lora_is_finite, resume_training, save_run_state, save_state_file

USED_SETTINGS = ["checkpoint_path", "checkpoint_config", "reward_model_path", "lora_path", "lora_name_prefix",
                 "lora_rank", "device", "attention_backend", "prompt", "prompt_file", "negative_prompt", "height",
                 "width", "num_inference_steps", "guidance_scale", "eta",
                 "train_policy_num_epochs", "train_save_freq", "train_sample_batch_size",
                 "train_sample_num_batches_per_epoch", "train_policy_batch_size", "train_optimizer_steps_per_epoch",
                 "train_policy_learning_rate", "train_images_per_prompt", "train_advantage_baseline",
                 "train_adv_clip_max", "train_clip_range", "train_kl_weight", "train_kl_fraction",
                 "train_reward_pessimism", "train_timestep_fraction",
                 "train_timesteps_per_call", "train_gradient_checkpointing", "train_offload_frozen", "train_compile",
                 "train_preview_seeds", "train_preview_prompts", "mixed_precision", "seed"]
SKIPPED_STEPS_TO_STOP = 3  # optimizer steps in a row whose loss or gradients were not finite


def image_seeds(seed, epoch, count):
    """Seeds of the epoch's images: the same for any number of processes, so a run is reproducible."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randint(0, 2**31 - 1, (count,), generator=generator).tolist()


def sample_epoch(sampler, reward_model, seeds, prompts, batch_size, height, width, num_inference_steps, show_progress,
                 pessimism=0.0):
    """Sample the given seeds in batches, image i conditioned on row i of `prompts` (PROMPT_KEYS entries,
    (n, ...) each); returns the epoch's record, each tensor with a leading (n,), those entries among them.

    "rewards" are what the policy maximises: the ensemble's mean less `pessimism` x its members' spread
    (ddpo/reward_model.py); "member_spreads" that spread.
    """
    records = []
    for start in tqdm(range(0, len(seeds), batch_size), desc="sampling", leave=False, disable=not show_progress):
        generators = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
        batch_prompts = {key: value[start:start + batch_size] for key, value in prompts.items()}  # (b, ...)
        record = sample_with_logprob(with_prompts(sampler, batch_prompts), generators, height, width,
                                     num_inference_steps)
        record.update(batch_prompts)
        scores = member_scores(reward_model, record["latents"][:, -1])  # (members, b): the CNNs on x_0, no VAE
        record["rewards"] = pessimistic_reward(scores, pessimism)  # (b,)
        record["member_spreads"] = scores.std(0, correction=0)  # (b,)
        record["timesteps"] = record["timesteps"].expand(len(generators), -1)  # (b, steps)
        records.append(record)
    return {key: torch.cat([r[key] for r in records]) for key in records[0]}


def training_minibatches(samples, advantages, batch_size, timestep_fraction, generator, kl_fraction=0.0):
    """Shuffle samples and, per sample, its timesteps (keeping trained_timesteps of them).

    Returns minibatches: latents/next_latents (b, k, 4, h/8, w/8), log_probs/timesteps (b, k), advantages (b,)
    and, when the samples hold them, each image's prompt entries (PROMPT_KEYS: prompt_embeds (b, 77, dim), ...).
    kl_fraction > 0 adds kl_measured (b, k): the share of the epoch's images whose KL to the base model is
    measured (ddpo/kl.py measured_steps; in shuffled order, so a random-like sample of them).
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
        **{key: samples[key] for key in PROMPT_KEYS if key in samples},  # per image, like the advantages
        **({"kl_measured": measured_steps(n, k, kl_fraction)[torch.argsort(order)].to(samples["log_probs"].device)}
           if kl_fraction else {}),
    }
    return [{key: value[order[start:start + batch_size]] for key, value in chosen.items()}
            for start in range(0, n, batch_size)]


def train_epoch(trainer, optimizer, minibatches, clip_range, timesteps_per_call, optimizer_steps, precision,
                no_sync=nullcontext, reduce=lambda gradients: gradients, show_progress=False, kl=None):
    """PPO over the minibatches, their gradients summed into `optimizer_steps` AdamW steps.

    Every backward runs in `no_sync` (accelerate's: no all-reduce per backward); `reduce` then averages
    each step's summed gradients over the processes, once. Returns the mean loss, clipfrac and
    approx_kl (and with `kl`, ddpo/kl.py KLToBase, kl_to_base: the mean over the measured steps), and each
    step's outcome in "steps": "ok", or why it was skipped: "nonfinite_loss", or "nonfinite_gradient" (the
    loss was finite: an overflow, or a diverging model).
    """
    trainer.unet.train()
    parameters = [p for p in trainer.unet.parameters() if p.requires_grad]
    means = {"loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    kl_sum, kl_count = 0.0, 0
    outcomes = []
    per_step = len(minibatches) // optimizer_steps
    bar = tqdm(total=len(minibatches), desc="training", leave=False, disable=not show_progress)
    for first in range(0, len(minibatches), per_step):
        total = [torch.zeros_like(p) for p in parameters]  # the step's gradient, fp32 like the LoRA
        loss_is_finite = True
        for minibatch in minibatches[first:first + per_step]:
            with no_sync():
                stats = precision.accumulate(
                    lambda: policy_gradient_backward(trainer, minibatch, clip_range, timesteps_per_call,
                                                     precision.backward, kl), parameters, total)
            loss_is_finite &= math.isfinite(stats["loss"])
            for key in means:
                means[key] += stats[key] / len(minibatches)
            if kl is not None:
                kl_sum += stats["kl_to_base"] * stats["kl_measured_steps"]  # a mean over every measured step
                kl_count += stats["kl_measured_steps"]
            bar.update()
        for p, summed in zip(parameters, reduce(total)):
            p.grad = summed
        if gradients_are_finite(parameters):  # the reduced sum: every process decides alike
            optimizer.step()
            outcomes.append("ok")
        else:
            outcomes.append("nonfinite_gradient" if loss_is_finite else "nonfinite_loss")
        optimizer.zero_grad(set_to_none=True)
    bar.close()
    if kl is not None:
        means["kl_to_base"] = kl_sum / max(kl_count, 1)
    return {**means, "steps": outcomes}


def mean_over_processes(accelerator):
    """Average a list of gradients over the processes in one all-reduce."""
    def reduce(gradients):
        if accelerator.num_processes == 1:
            return gradients
        flat = accelerator.reduce(torch.cat([g.flatten() for g in gradients]), "mean")
        return [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in gradients]), gradients)]
    return reduce


def prompt_groups(texts):
    """(n,) id of each image's prompt text, numbered in order of first appearance."""
    ids = {}
    return torch.tensor([ids.setdefault(text, len(ids)) for text in texts])


def run_epoch(settings, epoch, accelerator, sampler, trainer, optimizer, precision, reward_model, prompts,
              training_call=None, after_sampling=lambda: None):
    """One epoch: SAMPLING, advantages over every process's rewards, TRAINING.

    `prompts` (utils/conditioning.py PromptSet) draws the epoch's prompt groups and holds their conditioning.
    `training_call` (checkpointing, timesteps per call) is fitted on this epoch's samples when None.
    `after_sampling` runs between the phases (the benchmark reads memory there).
    Returns {"rewards" (all images,), "member_spread" (the CNNs' mean disagreement), "prompts" (of each prompt
    group), "stats", "steps" (outcomes), "training_call", "seconds", "cpu_seconds"}.
    """
    synchronize = torch.cuda.synchronize if accelerator.device.type == "cuda" else lambda: None
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    started = {name: clock() for name, clock in clocks.items()}

    # ---------------------------------------------------------------- SAMPLING
    rank, per_process = accelerator.process_index, images_per_epoch(settings) // accelerator.num_processes
    share = slice(rank * per_process, (rank + 1) * per_process)
    seeds = image_seeds(settings.seed, epoch, images_per_epoch(settings))[share]
    # Every process draws the whole epoch's prompts (a function of seed and epoch) and takes its share.
    texts = prompts.image_prompts(settings.seed, epoch, images_per_epoch(settings), images_per_prompt(settings))
    prompts.prepare(texts[share])
    sampler.unet.eval()
    samples = sample_epoch(sampler, reward_model, seeds, prompts.record(texts[share]), settings.train_sample_batch_size,
                           settings.height, settings.width, settings.num_inference_steps, accelerator.is_main_process,
                           settings.train_reward_pessimism)
    # Advantages are normalised over every process's rewards, as one process would over all images.
    all_rewards = accelerator.gather(samples["rewards"])  # (images_per_epoch,), in seed order
    spread = accelerator.gather(samples["member_spreads"]).mean().item()
    groups = prompt_groups(texts) if settings.train_advantage_baseline == "prompt" else None
    advantages = compute_advantages(all_rewards, settings.train_adv_clip_max, groups)[share]
    synchronize()
    sampled = {name: clock() for name, clock in clocks.items()}
    after_sampling()

    # ---------------------------------------------------------------- TRAINING
    generator = torch.Generator().manual_seed(settings.seed * 7919 + epoch * 31 + rank)
    minibatches = training_minibatches(samples, advantages, settings.train_policy_batch_size,
                                       settings.train_timestep_fraction, generator, settings.train_kl_fraction)
    kl = KLToBase(sampler, settings.train_kl_weight) if settings.train_kl_fraction else None
    if training_call is None:
        candidates = training_call_candidates(settings.train_gradient_checkpointing, settings.train_timesteps_per_call,
                                              minibatches[0]["log_probs"].shape[1])
        training_call = fit_training_calls(accelerator, trainer, optimizer, minibatches[0], candidates,
                                           settings.train_clip_range, precision.backward, kl)
    stats = train_epoch(trainer, optimizer, minibatches, settings.train_clip_range, training_call[1],
                        settings.train_optimizer_steps_per_epoch, precision,
                        lambda: accelerator.no_sync(trainer.unet), mean_over_processes(accelerator),
                        accelerator.is_main_process, kl=kl)
    steps = stats.pop("steps")
    # Each process trained on its share of the images: log the mean over all of them.
    stats = {key: accelerator.reduce(torch.tensor(value, device=accelerator.device), "mean").item()
             for key, value in stats.items()}
    synchronize()
    trained = {name: clock() for name, clock in clocks.items()}
    return {"rewards": all_rewards, "member_spread": spread, "prompts": texts[::images_per_prompt(settings)],
            "stats": stats, "steps": steps,
            "training_call": training_call,
            "seconds": {"sampling": sampled["wall"] - started["wall"], "training": trained["wall"] - sampled["wall"]},
            "cpu_seconds": {"sampling": sampled["cpu"] - started["cpu"], "training": trained["cpu"] - sampled["cpu"]}}


def load_models(settings, checkpoint_path, device, dtype):
    """(pipeline, the run's PromptSet) as training uses them; with train_offload_frozen the text encoders
    are on the CPU once the prompts are encoded (utils/conditioning.py says when that is)."""
    pipeline = load_pipeline(checkpoint_path, device, dtype, settings.checkpoint_config)
    prompts = PromptSet(prompt_lines(settings), pipeline_encoder(pipeline, settings.negative_prompt, settings.height,
                                                                 settings.width, device, settings.train_offload_frozen))
    if settings.train_offload_frozen:
        pipeline.vae.to("cpu")  # the VAE only visits the GPU for previews
    pipeline.vae.enable_slicing()  # previews decode one image at a time: the same images in a fraction of the memory
    return pipeline, prompts


def sample_preview(sampler, reward_model, prompts, seeds, texts, height, width, num_inference_steps):
    """Fixed seeds x preview prompts `texts`, without the LoRA and with it. Returns {"latents" (prompts x 2 x
    seeds, 4, h/8, w/8): per prompt the base model's row, then the LoRA's; "rewards" (the same n,); "captions"
    [(head, prompt)]; "kl_to_base": the LoRA's mean KL to the base model along its own images}."""
    latents, captions, kls = [], [], []
    for text in texts:
        denoiser = replace(sampler, **prompts.conditioning(text))
        for with_lora in (False, True):
            sampler.unet.enable_adapters() if with_lora else sampler.unet.disable_adapters()
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            record = sample_with_logprob(denoiser, generators, height, width, num_inference_steps)
            latents.append(record["latents"][:, -1])
            captions += [(f"{'LoRA' if with_lora else 'base'} seed {s}", text) for s in seeds]
        kls.append(trajectory_kl_to_base(denoiser, record))  # (seeds,), the LoRA's (adapters are on again)
    latents = torch.cat(latents)
    return {"latents": latents, "rewards": reward_model(latents), "captions": captions,
            "kl_to_base": torch.cat(kls).mean().item()}


def save_preview(path, pipeline, preview, seeds, height, width):
    """The preview's contact sheet, each image with its reward and prompt, the first LoRA image with the KL
    to the base model, so a person sees what the LoRA does, how far it went, and whether it does it to a
    prompt it was not trained on. Returns the LoRA's row of the first prompt."""
    vae_home = pipeline.vae.device
    pipeline.vae.to(pipeline.unet.device)
    images = decode_latents(pipeline, preview["latents"])
    pipeline.vae.to(vae_home)
    thumbnail = min(max(height, width, 128), 384)
    characters = thumbnail // 7  # what fits under a thumbnail in the sheet's 13 px font
    captions = [f"{head} {r:+.2f}" + (f"  KL {preview['kl_to_base']:.1e}" if i == len(seeds) else "")
                + f"\n{text if len(text) <= characters else text[:characters - 1] + '…'}"
                for i, ((head, text), r) in enumerate(zip(preview["captions"], preview["rewards"].tolist()))]
    contact_sheet(path, images, captions, thumbnail=thumbnail, columns=len(seeds))
    return images[len(seeds):2 * len(seeds)]


def run_files(settings):
    """The run's own files in lora_path, named with lora_name_prefix so that two runs can share the folder."""
    names = {"metrics": "policy_metrics.jsonl", "plot": "policy_metrics.png", "state": STATE_FILE}
    return {kind: os.path.join(settings.lora_path, settings.lora_name_prefix + name) for kind, name in names.items()}


def save_epoch(settings, epoch, pipeline, sampler, optimizer, reward_model, prompts, previews, preview=None):
    """The epoch's files, the diffusers LoRA last: resume and generate find an epoch by it, so a save
    that a kill interrupts is not taken for complete (and the next run writes it again).
    `previews`: ([seed], [prompt]) of the preview grid, no seeds no grid; `preview`: sample_preview's of
    them, sampled now when None."""
    seeds_to_preview, prompts_to_preview = previews
    files = epoch_files(settings.lora_path, epoch, settings.lora_name_prefix)
    save_state_file(optimizer.state_dict(), files["optimizer"])
    written = [files["optimizer"]]
    if seeds_to_preview:
        preview = preview or sample_preview(sampler, reward_model, prompts, seeds_to_preview, prompts_to_preview,
                                            settings.height, settings.width, settings.num_inference_steps)
        lora_images = save_preview(files["preview"], pipeline, preview, seeds_to_preview, settings.height,
                                   settings.width)
        card = save_lora_card(settings.lora_path, epoch, settings.lora_name_prefix, lora_images[0])
        written += [files["preview"], card]
    family = model_family(pipeline)
    metadata = lora_metadata(settings, epoch, sampler.unet, family, prompts.lines)
    return [*save_lora(sampler.unet, settings.lora_path, epoch, settings.lora_name_prefix, metadata, family), *written]


def main(settings):
    use_cuda = settings.device.startswith("cuda")
    # Processes and devices only: precision is ddpo/precision.py's, whatever an accelerate config says
    accelerator = Accelerator(mixed_precision="no", cpu=not use_cuda)
    validate_settings(settings, accelerator.num_processes)
    check_names_fit(settings.lora_path, settings.lora_name_prefix, settings.train_policy_num_epochs)
    os.makedirs(settings.lora_path, exist_ok=True)
    # one run per outputs folder (the main process speaks for all of an accelerate launch's processes)
    with folder_lock(settings.lora_path, "train_policy") if accelerator.is_main_process else nullcontext():
        train(settings, accelerator)


def train(settings, accelerator):
    previews = seed_list(settings.train_preview_seeds, "train_preview_seeds"), preview_prompts(settings)
    reward_model = load_reward_model(settings.reward_model_path, accelerator.device)
    set_seed(settings.seed)
    device = accelerator.device
    precision = MixedPrecision.create(resolve_mixed_precision(settings.mixed_precision, device.type), device.type)

    # ---------------------------------------------------------------- MODELS
    # Frozen weights in the half dtype (half the memory), LoRA in fp32, autocast around every UNet call.
    pipeline, prompts = load_models(settings, settings.checkpoint_path, device, precision.weights_dtype)
    family = model_family(pipeline)
    check_family(settings.reward_model_path, family, "the latents of checkpoint_path's model")
    unet = pipeline.unet
    if settings.attention_backend == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as error:
            raise UserError(f"attention_backend=xformers failed ({error}); install xformers or use sdpa.") from None
    lora_parameters = add_lora(unet, settings.lora_rank)
    optimizer = torch.optim.AdamW(lora_parameters, lr=settings.train_policy_learning_rate)

    files = run_files(settings)
    first_epoch, from_state = resume_training(settings.lora_path, settings.lora_name_prefix, unet, optimizer,
                                              precision, files["metrics"], accelerator.print, family)
    for group in optimizer.param_groups:  # a loaded optimizer state brings the saved run's learning rate
        group["lr"] = settings.train_policy_learning_rate
    if accelerator.is_main_process and not from_state and first_epoch <= settings.train_policy_num_epochs:
        # so that a kill before the first epoch's end finds the metrics lines as they were now
        save_run_state(files["state"], first_epoch - 1, unet, optimizer, precision, files["metrics"], family)
    unet = accelerator.prepare(unet)
    # Sampling needs no gradient sync between processes: it calls the unwrapped UNet.
    sampler = Denoiser(accelerator.unwrap_model(unet), pipeline.scheduler, guidance_scale=settings.guidance_scale,
                       eta=settings.eta, autocast=precision.autocast,
                       **prompts.conditioning(prompts.first))  # each batch replaces the prompt with its own
    trainer = replace(sampler, unet=torch.compile(unet) if settings.train_compile else unet)
    last_saved = epoch_files(settings.lora_path, first_epoch - 1, settings.lora_name_prefix)["diffusers"]
    if first_epoch > 1 and is_save_epoch(settings, first_epoch - 1) and accelerator.is_main_process and \
            not os.path.isfile(last_saved):
        paths = save_epoch(settings, first_epoch - 1, pipeline, sampler, optimizer, reward_model, prompts, previews)
        accelerator.print(f"completed the interrupted save of epoch {first_epoch - 1}: {', '.join(paths)}")

    per_process = images_per_epoch(settings) // accelerator.num_processes
    accelerator.print(
        f"{images_per_epoch(settings)} images per epoch ({settings.train_sample_num_batches_per_epoch} x "
        f"{settings.train_sample_batch_size}) on {accelerator.num_processes} process(es); per process "
        f"{per_process // settings.train_policy_batch_size} forward/backward passes of "
        f"{settings.train_policy_batch_size} image(s) x "
        f"{trained_timesteps(settings.num_inference_steps, settings.train_timestep_fraction)} timesteps, "
        f"accumulated into {settings.train_optimizer_steps_per_epoch} optimizer step(s); precision {precision.name}")
    if settings.prompt_file:
        groups = images_per_epoch(settings) // images_per_prompt(settings)
        accelerator.print(
            f"prompts: {len(prompts.lines)} line(s) of {settings.prompt_file}, {groups} prompt(s) x "
            f"{images_per_prompt(settings)} image(s) per epoch, advantages against the "
            f"{settings.train_advantage_baseline}'s mean; text conditioning encoded "
            f"{'once, up front' if prompts.all_up_front else 'per epoch (too many distinct prompts to keep)'}")
    accelerator.print(guards_line(settings))
    run_started = time.strftime("%Y-%m-%d %H:%M:%S")  # in each metrics record: the plot marks where a run resumed
    training_call = None  # (gradient checkpointing, timesteps per UNet call), fitted on the first epoch's samples
    skipped_in_a_row = 0

    for epoch in range(first_epoch, settings.train_policy_num_epochs + 1):
        result = run_epoch(settings, epoch, accelerator, sampler, trainer, optimizer, precision, reward_model,
                           prompts, training_call)
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
                   "reward_std": rewards.std(correction=0).item(), "member_spread": result["member_spread"], **stats,
                   "skipped_steps": sum(outcome != "ok" for outcome in result["steps"]),
                   **({"loss_scale": precision.loss_scale} if precision.name == "fp16" else {}),
                   "sampling_seconds": seconds["sampling"], "training_seconds": seconds["training"],
                   **({"prompts": result["prompts"]} if settings.prompt_file else {})}  # the epoch's, one per group
        preview = None
        if accelerator.is_main_process:
            if not lora_is_finite(sampler.unet):
                raise UserError(f"the LoRA's weights are not finite after epoch {epoch}; nothing of this epoch was "
                                f"saved. Lower train_policy_learning_rate or set mixed_precision=no, then rerun.")
            if is_save_epoch(settings, epoch) and previews[0]:  # the saved LoRA's own reward and drift
                preview = sample_preview(sampler, reward_model, prompts, *previews, settings.height, settings.width,
                                         settings.num_inference_steps)
                lora_rows = preview["rewards"].view(len(previews[1]), 2, len(previews[0]))[:, 1]  # (prompts, seeds)
                metrics["saved_reward"] = lora_rows.mean().item()
                metrics["saved_kl_to_base"] = preview["kl_to_base"]
            append_jsonl(files["metrics"], metrics)
            crash_point("train_policy.metrics_written")
            plot_metrics(files["plot"], read_jsonl(files["metrics"]), settings, prompt_summary(prompts.lines))
            save_run_state(files["state"], epoch, sampler.unet, optimizer, precision, files["metrics"], family)
        accelerator.print(
            f"epoch {epoch}: reward {metrics['reward_mean']:.4f} ± {metrics['reward_std']:.4f}, "
            f"loss {stats['loss']:.4g}, clipfrac {stats['clipfrac']:.3f}, kl {stats['approx_kl']:.2e}, "
            + (f"KL to base {stats['kl_to_base']:.2e}, " if "kl_to_base" in stats else "")
            + f"sampling {seconds['sampling']:.1f}s, training {seconds['training']:.1f}s"
            + (f", {metrics['skipped_steps']} step(s) skipped (not finite)" if metrics["skipped_steps"] else ""))
        skipped_in_a_row = count_skipped_steps(skipped_in_a_row, result["steps"], precision, epoch)
        if is_save_epoch(settings, epoch):
            if accelerator.is_main_process:
                paths = save_epoch(settings, epoch, pipeline, sampler, optimizer, reward_model, prompts, previews,
                                   preview)
                accelerator.print(f"saved {', '.join(paths)}")
            accelerator.wait_for_everyone()
    if first_epoch > settings.train_policy_num_epochs:
        accelerator.print(f"nothing to do: epoch {first_epoch - 1} is done and train_policy_num_epochs is "
                          f"{settings.train_policy_num_epochs}; raise it to train on.")


def guards_line(settings):
    """The start-up line on the guards against reward hacking (docs/policy.md)."""
    measured = (f"KL to the base model logged every epoch, measured on {settings.train_kl_fraction:.0%} of the "
                f"epoch's images (one no-grad UNet call more per trained step of those)" if settings.train_kl_fraction
                else "KL to the base model not measured (train_kl_fraction = 0)")
    return (f"guards: {measured}; "
            f"train_kl_weight={settings.train_kl_weight}{' (off)' if not settings.train_kl_weight else ''}, "
            f"train_reward_pessimism={settings.train_reward_pessimism}"
            f"{' (off: the plain ensemble mean)' if not settings.train_reward_pessimism else ''}")


def plot_metrics(path, records, settings, prompts):
    """outputs/policy_metrics.png; each saved epoch marked with its LoRA's reward and KL to the base model
    (its previews', else the epoch's images'), so a person can pick the epoch to keep."""
    saved = [r for r in records if isinstance(r.get("epoch"), int) and is_save_epoch(settings, r["epoch"])
             and isinstance(r.get("reward_mean"), (int, float))]
    marks = [(r["epoch"], f"{r.get('saved_reward', r['reward_mean']):+.2f}\n"
                          f"KL {r.get('saved_kl_to_base', r.get('kl_to_base', 0)):.0e}") for r in saved]
    plot_curves(path, records, "epoch",
                [("reward of the epoch's images", [("reward_mean", "reward_std"), "saved_reward"]),
                 ("PPO loss", ["loss"]), ("seconds", ["sampling_seconds", "training_seconds"]),
                 ("share of clipped ratios", ["clipfrac"]), ("approx. KL to the sampling policy", ["approx_kl"]),
                 ("KL to the base model (nats per latent dim and step)", ["kl_to_base", "saved_kl_to_base"])],
                f"DDPO: {prompts}", marks=marks)


def is_save_epoch(settings, epoch):
    return epoch % settings.train_save_freq == 0 or epoch == settings.train_policy_num_epochs


def count_skipped_steps(in_a_row, outcomes, precision, epoch):
    """Skipped steps in a row after this epoch's; too many stop the run with the cause and what to change.

    Every process decides a step on the same all-reduced gradient, so all count alike.
    """
    for outcome in outcomes:
        in_a_row = 0 if outcome == "ok" else in_a_row + 1
    if in_a_row >= SKIPPED_STEPS_TO_STOP:
        cause = "loss was" if "nonfinite_loss" in outcomes else "gradients were"
        advice = ("set mixed_precision=bf16 (if the GPU has it) or mixed_precision=no"
                  if precision.name == "fp16" else "lower train_policy_learning_rate")
        raise UserError(f"the {cause} not finite in {in_a_row} optimizer steps in a row (up to epoch {epoch}, "
                        f"mixed_precision={precision.name}); they were skipped and nothing non-finite was saved: "
                        f"{advice}, then rerun to resume.")
    return in_a_row


if __name__ == "__main__":
    run_stage(main, USED_SETTINGS)
