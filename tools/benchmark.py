"""Speed and memory of train_policy's epoch, measured before downloading anything.

    python -m tools.benchmark --arch tiny --height 64 --width 64 --device cpu --compare --out bench/results/tiny64.json
    python -m tools.benchmark --arch tiny --height 64 --width 64 --device cpu --prompts 4 --compare
    python -m tools.benchmark --arch sd15 --height 512 --width 512 --device cpu --samples 1 --steps 1 --compare
    python -m tools.benchmark --arch sd15 --height 1080 --width 720 --device cuda --compare
    python -m tools.benchmark --arch sd15 --height 1080 --width 720 --device cuda --memory_limit_gib 8
    python -m tools.benchmark --arch sdxl --height 1024 --width 1024 --device cuda --compare
    python -m tools.benchmark --arch sdxl --height 1024 --width 1024 --device cuda --memory_limit_gib 16

Runs train_policy's own sampling and training functions on random weights: the tiny checkpoints
(tools/tiny_checkpoint.py: tiny, tiny_sdxl), SD1.5's UNet architecture (860M parameters) or SDXL's
(2.6B parameters, with its added conditioning), with random text embeddings. Any config.py setting can be
given as --name=value, e.g. --train_timesteps_per_call=20.
--prompts N trains each epoch on N prompts (a prompt file of N lines, --samples / N images each), every
image with its own text embedding; with --compare, one run on a single prompt gives the cost of that.
Reports seconds per image for sampling and for training, and memory: CUDA max allocated, or on
CPU the peak resident set (each configuration runs in its own process, so peaks do not mix).
"Activation" memory is the training phase's peak minus the memory in use just before it.
Achieved TFLOP/s come from FLOPs counted on the architecture (torch's FlopCounterMode, meta device),
shown against the GPU's peak where known (--peak_tflops otherwise). --compare runs the same work
again with each speed/memory setting set each way (and fp32 on cuda), so the ratios come out of
one run. --memory_limit_gib 8 makes a bigger GPU behave as an 8 GB one. Writes JSON to --out
(bench/results/ is git-ignored).
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import zlib
from dataclasses import replace

import torch

import config
from ddpo.lora import add_lora
from ddpo.precision import WEIGHT_DTYPES, MixedPrecision, resolve_mixed_precision
from ddpo.reward_model import LatentRewardModel
from ddpo.sampling import Denoiser, schedule_on, sdxl_time_ids
from ddpo.training_calls import set_gradient_checkpointing, training_call_candidates
from tools.footprint import meta_unet_inputs, training_activation_bytes, weight_bytes
from train_policy import load_models, run_epoch
from utils.checkpoint import CONFIGS
from utils.cli import SettingsError, parse_settings, trained_timesteps
from utils.conditioning import PromptSet
from utils.prompts import prompt_lines


def real_unet_config(arch):
    """SD1.5's or SDXL base 1.0's (2.57B parameters) unet/config.json, as shipped in utils/configs/; random weights."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.load_config(str(CONFIGS / arch / "unet"))


# Dense fp16/bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity); others: --peak_tflops.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def peak_tflops(gpu_name):
    return next((peak for name, peak in PEAK_TFLOPS.items() if gpu_name and name in gpu_name), None)


def flops_per_image_step(config, settings, checkpointing, per_call):
    """FLOPs of one image's DDIM step: (sampling, training).

    Sampling is one guided forward; training a forward and a backward, and the forward again under
    checkpointing. Counted on the UNet architecture `config` on the meta device: shapes only, no compute.
    """
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        copy = UNet2DConditionModel.from_config(config)
    add_lora(copy, settings.lora_rank)
    set_gradient_checkpointing(copy, checkpointing)

    def flops(batch, train):
        inputs = meta_unet_inputs(config, batch, settings.height, settings.width, torch.float32)
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
            output = copy(**inputs).sample
            if train:
                output.sum().backward()
        return counter.get_total_flops() / batch

    return flops(1, False), flops(per_call, True)


def random_encoder(unet, settings, device, dtype):
    """texts -> {text: Denoiser conditioning} of random embeddings, each text's own (seeded by the text), as
    utils/conditioning.py's pipeline_encoder gives them for a real text encoder."""
    def conditioning(seed):
        embeds = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(seed))
        if unet.config.addition_embed_type != "text_time":
            return embeds.to(device, dtype), None
        added = random_added_conditioning(unet.config, settings.height, settings.width, seed)
        return embeds.to(device, dtype), {key: value.to(device, dtype) for key, value in added.items()}

    negative_embeds, negative_added = conditioning(1)

    def encode(texts):
        return {text: dict(zip(("positive_embeds", "positive_added"), conditioning(zlib.crc32(text.encode()))),
                           negative_embeds=negative_embeds, negative_added=negative_added) for text in texts}
    return encode


def random_added_conditioning(unet_config, height, width, seed):
    """SDXL's added conditioning for random weights: a random pooled text embedding (1, pooled dim) and
    the size ids of a height x width image (1, 6)."""
    pooled_dim = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    return {"text_embeds": torch.randn(1, pooled_dim, generator=torch.Generator().manual_seed(seed)),
            "time_ids": sdxl_time_ids(height, width)}


class Memory:
    """Bytes in use and the peak since the last reset: CUDA's allocator, or the process's resident set."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.proc = os.path.exists("/proc/self/clear_refs")  # Linux; elsewhere CPU memory is not reported

    def _status(self, field):
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024

    def now(self):
        if self.cuda:
            return torch.cuda.memory_allocated()
        return self._status("VmRSS") if self.proc else None

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.proc:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set

    def peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM") if self.proc else None


def build_models(arch, settings, device, dtype, scratch):
    """(unet, scheduler, the run's PromptSet) as train_policy has them after loading."""
    from diffusers.utils import logging as diffusers_logging

    from tools.tiny_checkpoint import build_tiny_checkpoint, build_tiny_sdxl_checkpoint, sd15_scheduler

    diffusers_logging.set_verbosity_error()  # casting a fresh UNet with .to(dtype) warns, though nothing is lost

    if arch in ("tiny", "tiny_sdxl"):
        build = build_tiny_checkpoint if arch == "tiny" else build_tiny_sdxl_checkpoint
        pipeline, prompts = load_models(settings, build(os.path.join(scratch, "checkpoint")), device, dtype)
        return pipeline.unet, pipeline.scheduler, prompts
    from diffusers import UNet2DConditionModel

    # Only the UNet: with train_offload_frozen, train_policy's text encoders and VAE are not on the device either.
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(real_unet_config(arch)).to(device, dtype)
    # SDXL's DDIM schedule is SD1.5's
    return unet, schedule_on(sd15_scheduler(), device), PromptSet(prompt_lines(settings),
                                                                  random_encoder(unet, settings, device, dtype))


def measure(arch, settings, epochs, memory_limit_gib=None):
    """Run `epochs` of train_policy's own epoch (run_epoch) in this process; returns the figures."""
    from accelerate import Accelerator

    use_cuda = settings.device.startswith("cuda")
    accelerator = Accelerator(mixed_precision="no", cpu=not use_cuda)  # precision: ddpo/precision.py
    device, memory = accelerator.device, Memory(accelerator.device)
    if use_cuda and memory_limit_gib:  # behave as a smaller GPU: allocations past the limit raise out-of-memory
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, memory_limit_gib * 2**30 / torch.cuda.get_device_properties(device).total_memory), device)
    precision = MixedPrecision.create(resolve_mixed_precision(settings.mixed_precision, device.type), device.type)
    dtype = precision.weights_dtype
    with tempfile.TemporaryDirectory() as scratch:
        unet, scheduler, prompts = build_models(arch, settings, device, dtype, scratch)
    lora_parameters = add_lora(unet, settings.lora_rank)
    torch.manual_seed(0)
    reward_model = LatentRewardModel().to(device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(lora_parameters, lr=settings.train_policy_learning_rate)
    unet = accelerator.prepare(unet)
    sampler = Denoiser(accelerator.unwrap_model(unet), scheduler, guidance_scale=settings.guidance_scale,
                       eta=settings.eta, autocast=precision.autocast, **prompts.conditioning(prompts.first))
    trainer = replace(sampler, unet=torch.compile(unet) if settings.train_compile else unet)
    result = {"precision": precision.name, "unet_parameters": sum(p.numel() for p in sampler.unet.parameters()),
              "lora_parameters": sum(p.numel() for p in lora_parameters), "memory_after_load": memory.now(),
              "epochs": []}
    training_call = None
    for epoch in range(1, epochs + 1):
        phase = {}

        def after_sampling():
            phase["sampling_peak"] = memory.peak()
            phase["memory_before_training"] = memory.now()
            memory.reset_peak()

        memory.reset_peak()
        epoch_result = run_epoch(settings, epoch, accelerator, sampler, trainer, optimizer, precision, reward_model,
                                 prompts, training_call, after_sampling)
        training_peak = memory.peak()
        if training_call is None:  # as train_policy: the auto settings are resolved once, on the first epoch
            training_call = epoch_result["training_call"]
            result["gradient_checkpointing"], result["timesteps_per_call"] = training_call
            result["sampling_flops_per_image_step"], result["training_flops_per_image_step"] = flops_per_image_step(
                sampler.unet.config, settings, *training_call)
        seconds, cpu_seconds = epoch_result["seconds"], epoch_result["cpu_seconds"]
        result["epochs"].append({
            "sampling_seconds": seconds["sampling"], "training_seconds": seconds["training"],
            "sampling_cpu_seconds": cpu_seconds["sampling"], "training_cpu_seconds": cpu_seconds["training"],
            "training_peak": training_peak, **phase,
            "training_activation": None if training_peak is None else training_peak - phase["memory_before_training"]})
    return result


def summarise(run, samples, steps, trained_steps):
    """Per-image figures of the run's last epoch (the first one pays for warm-up and compilation).

    Wall-clock seconds are what a user waits; CPU seconds (all threads) are steadier on a shared machine.
    """
    last = run["epochs"][-1]
    figures = {"peak_memory": max(filter(None, (last["sampling_peak"], last["training_peak"])), default=None),
               "training_activation_memory": last["training_activation"]}
    for clock in ("", "cpu_"):
        sampling, training = last[f"sampling_{clock}seconds"] / samples, last[f"training_{clock}seconds"] / samples
        figures.update({
            f"sampling_{clock}seconds_per_image": sampling, f"training_{clock}seconds_per_image": training,
            f"training_over_sampling_{clock}per_image": training / sampling,
            f"training_over_sampling_{clock}per_image_step": (training / trained_steps) / (sampling / steps)})
    # Achieved compute: what the hardware did, to hold against its peak.
    figures["sampling_tflops_per_second"] = run["sampling_flops_per_image_step"] * steps / figures[
        "sampling_seconds_per_image"] / 1e12
    figures["training_tflops_per_second"] = run["training_flops_per_image_step"] * trained_steps / figures[
        "training_seconds_per_image"] / 1e12
    figures["training_over_sampling_flops_per_image_step"] = (run["training_flops_per_image_step"]
                                                              / run["sampling_flops_per_image_step"])
    return figures


CUDA_OVERHEAD = 1.0 * 2**30  # CUDA context and cuBLAS/cuDNN workspaces: outside the counted tensors
GPU_SIZES_GIB = (8, 12, 16, 24)


def count_only(arch, settings, trained_steps, gpu_sizes_gib):
    """--count_only: FLOPs and the estimated GPU memory of a training step from the architecture alone (meta
    device, tools/footprint.py), and the training call `auto` would settle on for each GPU size."""
    from diffusers.utils import logging as diffusers_logging

    from tools.tiny_checkpoint import tiny_sdxl_unet, tiny_unet

    diffusers_logging.set_verbosity_error()  # casting the meta UNet to fp16 warns, though nothing is lost
    config = real_unet_config(arch) if arch in ("sd15", "sdxl") else dict(
        (tiny_unet() if arch == "tiny" else tiny_sdxl_unet()).config)
    dtype = WEIGHT_DTYPES[resolve_mixed_precision(settings.mixed_precision, "cuda")]  # as on the GPU it estimates
    frozen, lora_state = weight_bytes(config, settings.lora_rank, dtype)
    report = {"frozen_weights": frozen, "lora_weights_gradients_adam": lora_state, "cuda_overhead": CUDA_OVERHEAD,
              "dtype": str(dtype), "checkpointing": {}}
    for checkpointing in (False, True):
        sampling_flops, training_flops = flops_per_image_step(config, settings, checkpointing, 1)
        one, two = (training_activation_bytes(config, settings.lora_rank, checkpointing, n, settings.height,
                                              settings.width, dtype) for n in (1, 2))
        report["checkpointing"][checkpointing] = {
            "sampling_flops_per_image_step": sampling_flops, "training_flops_per_image_step": training_flops,
            "activation_one_timestep": one, "activation_each_further_timestep": two - one}
        print(f"checkpointing {'on ' if checkpointing else 'off'}: sampling {sampling_flops / 1e12:.2f} TFLOP, "
              f"training {training_flops / 1e12:.2f} TFLOP per image step; training activations {_gib(one)} for one "
              f"timestep per call, +{_gib(two - one)} per further timestep")

    def needed(candidate):
        checkpointing, per_call = candidate
        figures = report["checkpointing"][checkpointing]
        activations = figures["activation_one_timestep"] + (per_call - 1) * figures["activation_each_further_timestep"]
        return frozen + lora_state + CUDA_OVERHEAD + activations

    print(f"UNet weights {_gib(frozen)} ({dtype}), LoRA + gradients + AdamW {_gib(lora_state)}, CUDA context "
          f"~{_gib(CUDA_OVERHEAD)}")
    candidates = training_call_candidates(settings.train_gradient_checkpointing, settings.train_timesteps_per_call,
                                          trained_steps)
    report["fits"] = {}
    for size in gpu_sizes_gib:
        chosen = next((c for c in candidates if needed(c) <= size * 2**30), None)
        report["fits"][size] = chosen and {"gradient_checkpointing": chosen[0], "timesteps_per_call": chosen[1],
                                           "estimated_memory": needed(chosen)}
        fits = "nothing fits" if chosen is None else (f"checkpointing {'on' if chosen[0] else 'off'}, {chosen[1]} "
                                                      f"timestep(s) per call, ~{_gib(needed(chosen))}")
        print(f"{size:g} GB GPU: {fits}")
    return report


def variants(settings, trained_steps, use_cuda):
    """The base run, then one run per speed/memory setting set each way: (name, settings overrides)."""
    runs = [("default", {})]
    if settings.prompt_file:  # the cost of each image's own text embedding: the same epoch on one prompt
        runs.append(("one prompt", {"prompt_file": "", "train_images_per_prompt": 0}))
    for per_call in sorted({1, trained_steps} - {settings.train_timesteps_per_call}):
        runs.append((f"train_timesteps_per_call={per_call}", {"train_timesteps_per_call": per_call}))
    for checkpointing in [True, False]:
        if checkpointing != settings.train_gradient_checkpointing:
            runs.append((f"train_gradient_checkpointing={checkpointing}",
                         {"train_gradient_checkpointing": checkpointing}))
    for fraction in sorted({0.0, 1.0} - {settings.train_kl_fraction}):  # the cost of measuring the KL to base
        runs.append((f"train_kl_fraction={fraction:g}", {"train_kl_fraction": fraction}))
    if use_cuda and resolve_mixed_precision(settings.mixed_precision, "cuda") != "no":
        runs.append(("mixed_precision=no", {"mixed_precision": "no"}))
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "tiny_sdxl", "sd15", "sdxl"], default="tiny")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--device", default=config.device)
    parser.add_argument("--steps", type=int, default=config.num_inference_steps, help="DDIM steps per image")
    parser.add_argument("--samples", type=int, default=16, help="images per epoch")
    parser.add_argument("--epochs", type=int, default=1, help="figures are those of the last epoch")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per epoch, each image with its own embedding")
    parser.add_argument("--compare", action="store_true", help="also run with each speed/memory setting flipped")
    parser.add_argument("--memory_limit_gib", type=float,
                        help="cuda: act as a GPU with this much memory (e.g. 8), so auto settings choose as there")
    parser.add_argument("--peak_tflops", type=float,
                        help=f"the GPU's dense fp16/bf16 peak, to report utilisation (known: {', '.join(PEAK_TFLOPS)})")
    parser.add_argument("--count_only", action="store_true",
                        help="run nothing: FLOPs and estimated GPU memory from the architecture (meta device), "
                             "and what auto picks on 8/12/16/24 GB GPUs (or --memory_limit_gib)")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()

    batch = min(config.train_sample_batch_size, args.samples)
    if args.samples % batch:
        parser.error(f"--samples {args.samples} must be a multiple of train_sample_batch_size={batch}")
    if args.prompts > 1 and not args.child:  # the children get --prompt_file among the overrides
        if args.samples % args.prompts:
            parser.error(f"--samples {args.samples} must be a multiple of --prompts {args.prompts}")
        prompt_file = os.path.join(tempfile.mkdtemp(prefix="benchmark_prompts_"), "prompts.txt")
        with open(prompt_file, "w") as f:
            f.write("".join(f"a photo of thing number {i}\n" for i in range(args.prompts)))
        overrides += [f"--prompt_file={prompt_file}", f"--train_images_per_prompt={args.samples // args.prompts}"]
    try:
        settings = parse_settings([f"--height={args.height}", f"--width={args.width}", f"--device={args.device}",
                                 f"--num_inference_steps={args.steps}", f"--train_sample_batch_size={batch}",
                                 f"--train_sample_num_batches_per_epoch={args.samples // batch}", *overrides])
    except SettingsError as error:
        parser.error(str(error))
    use_cuda = settings.device.startswith("cuda")
    if args.count_only:
        trained_steps = trained_timesteps(args.steps, settings.train_timestep_fraction)
        report = {"arch": args.arch, "height": args.height, "width": args.width, "steps": args.steps,
                  "lora_rank": settings.lora_rank, **count_only(args.arch, settings, trained_steps,
                                                                 [args.memory_limit_gib] if args.memory_limit_gib
                                                                 else GPU_SIZES_GIB)}
        if args.out:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
        return
    if args.child:  # one configuration, in its own process: figures as JSON on the last line of stdout
        print(json.dumps(measure(args.arch, settings, args.epochs, args.memory_limit_gib)))
        return

    # glibc keeps freed heap memory resident, so a CPU process's peak would count tensors long gone;
    # giving every allocation above 128 KiB its own mapping returns it on free (CPU runs ~10% slower).
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ}
    trained_steps = trained_timesteps(args.steps, settings.train_timestep_fraction)
    gpu = torch.cuda.get_device_name() if use_cuda else None
    report = {"arch": args.arch, "height": args.height, "width": args.width, "samples": args.samples,
              "steps": args.steps, "trained_timesteps_per_image": trained_steps,
              "machine": {"device": args.device, "gpu": gpu,
                          "peak_tflops": args.peak_tflops or (peak_tflops(gpu) if use_cuda else None),
                          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "torch": torch.__version__,
                          "MALLOC_MMAP_THRESHOLD_": env["MALLOC_MMAP_THRESHOLD_"],
                          "memory_limit_gib": args.memory_limit_gib},
              "settings": {name: getattr(settings, name) for name in (
                  "lora_rank", "guidance_scale", "mixed_precision", "train_policy_batch_size",
                  "train_optimizer_steps_per_epoch", "train_timestep_fraction", "train_timesteps_per_call",
                  "train_gradient_checkpointing", "train_kl_fraction", "train_compile")},
              "runs": []}
    runs = variants(settings, trained_steps, use_cuda) if args.compare else [("default", {})]
    child_args = [f"--{name}={getattr(args, name)}" for name in ("arch", "height", "width", "device", "steps",
                                                                  "samples", "epochs", "memory_limit_gib")
                  if getattr(args, name) is not None] + overrides
    peak = report["machine"]["peak_tflops"]
    for name, changed in runs:
        command = [sys.executable, "-m", "tools.benchmark", "--child", *child_args,
                   *(f"--{k}={v}" for k, v in changed.items())]
        print(f"== {name}", file=sys.stderr, flush=True)
        # from the repository root, as this was started: the child imports config, ddpo and utils from there
        child = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if child.returncode:  # e.g. out of memory: a result too, and the other runs still go
            report["runs"].append({"name": name, "changed": changed, "failed": child.returncode})
            print(f"{name}: failed with exit code {child.returncode} (out of memory? see above)")
            continue
        run = {"name": name, "changed": changed, **json.loads(child.stdout.strip().splitlines()[-1])}
        run.update(summarise(run, args.samples, args.steps, trained_steps))
        report["runs"].append(run)
        print(f"{name} ({run['timesteps_per_call']} timesteps per call, checkpointing "
              f"{'on' if run['gradient_checkpointing'] else 'off'}): sampling "
              f"{run['sampling_seconds_per_image']:.3f} s/image, training "
              f"{run['training_seconds_per_image']:.3f} s/image ({run['training_over_sampling_per_image']:.2f}x; "
              f"CPU time {run['training_over_sampling_cpu_per_image']:.2f}x), peak {_gib(run['peak_memory'])}, "
              f"training activations {_gib(run['training_activation_memory'])}, achieved "
              f"{_tflops(run['sampling_tflops_per_second'], peak)} sampling, "
              f"{_tflops(run['training_tflops_per_second'], peak)} training")
    base = report["runs"][0]
    for run in report["runs"][1:]:
        if "failed" in run or "failed" in base:
            continue
        run["vs_default"] = {key: run[key] / base[key] for key in (
            "sampling_seconds_per_image", "training_seconds_per_image", "sampling_cpu_seconds_per_image",
            "training_cpu_seconds_per_image", "peak_memory", "training_activation_memory")
            if run[key] and base[key]}
        print(f"{run['name']} vs default: " + ", ".join(f"{k} x{v:.2f}" for k, v in run["vs_default"].items()))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")


def _tflops(value, peak):
    return f"{value:.3g} TFLOP/s" + (f" ({100 * value / peak:.0f}% of the {peak:g} peak)" if peak else "")


def _gib(value):
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


if __name__ == "__main__":
    main()
