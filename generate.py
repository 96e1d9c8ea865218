"""Stage 1: generate a round of images for a person to rate.

    python generate.py [--name=value ...]          (or: accelerate launch generate.py ...)

Reads   models/checkpoint/ (SD1.x or SDXL: a diffusers folder, or the checkpoint file checkpoint_path names) and,
        by default, the newest outputs/diffusers_lora_epoch_N.safetensors (--generate_lora=none for the base
        model, or a path).
Writes  samples/<seed>.png with WebUI-style `parameters`, samples/latents/<seed>.safetensors (the final
        latent, so no stage re-encodes PNGs), samples/round.json (the round's settings and seeds, and with a
        prompt_file each seed's prompt: a pure function of the seed, utils/prompts.py).
An interrupted run resumes: run it again and only the missing images are made. A new round (other
settings or LoRA, or the current one already rated) first moves the old one to samples/history/: its images,
latents, round.json and ratings, nothing else of the folder (utils/samples.py round_entries).
While it runs, samples/.lock keeps other generate runs and the rating page off the folder.
"""

import contextlib
import os
import random

import torch
from accelerate import PartialState
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from utils.checkpoint import model_family, model_identity
from utils.cli import run_stage
from utils.errors import UserError
from utils.files import crash_point, read_json, write_json_atomic, writing
from utils.locks import folder_lock
from utils.lora_files import latest_lora, load_lora_into_pipeline, ui_lora_name
from utils.pipeline import decode_latents, load_pipeline, text_tokenizers
from utils.prompts import check_token_lengths, prompt_for_seed, prompt_lines, prompt_set_parameters
from utils.samples import (
    ROUND_FILE,
    archive_round,
    finish_interrupted_archive,
    latent_file,
    round_images,
    save_latent,
    webui_parameters,
)

USED_SETTINGS = ["checkpoint_path", "checkpoint_config", "sample_path", "score_path", "comparison_path", "lora_path",
                 "lora_name_prefix", "generate_lora", "device",
                 "generate_sample_size", "generate_batch_size", "generate_vae_slicing", "generate_vae_tiling",
                 "prompt", "prompt_file", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale",
                 "eta"]


def resolve_lora(settings):
    """Path of the LoRA to load, or None."""
    if settings.generate_lora == "none":
        return None
    if settings.generate_lora == "latest":
        return latest_lora(settings.lora_path, settings.lora_name_prefix)[1]
    if not os.path.isfile(settings.generate_lora):
        raise UserError(f"--generate_lora={settings.generate_lora!r} is not a file; give a diffusers-format "
                        "LoRA .safetensors, 'latest' or 'none'.")
    return settings.generate_lora


def round_parameters(settings, lora, lines=None):
    """The settings that make a round's images; a round resumes only with all of them unchanged.

    With a prompt_file, its path and prompt lines (`lines`, read from it when not given) replace `prompt`.
    """
    checkpoint = {"checkpoint": os.path.abspath(settings.checkpoint_path)}
    model_hash = model_identity(settings.checkpoint_path)[1]  # hashed once per process, also for the PNGs
    if model_hash:  # a file: another model saved at the same path makes another round (a folder has no hash)
        checkpoint["checkpoint_hash"] = model_hash
    if settings.checkpoint_config:  # only when set, so that rounds made before the setting existed still resume
        checkpoint["checkpoint_config"] = os.path.abspath(settings.checkpoint_config)
    prompts = (prompt_set_parameters(settings.prompt_file, lines or prompt_lines(settings)) if settings.prompt_file
               else {"prompt": settings.prompt})
    return {**checkpoint, "lora": lora and os.path.abspath(lora),
            **prompts, "negative_prompt": settings.negative_prompt, "height": settings.height,
            "width": settings.width, "steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale, "eta": settings.eta}


def read_round(round_path):
    """round.json's {"parameters": {...}, "seeds": [int, ...]} (and "prompts": {"<seed>": prompt} if made from a
    prompt_file), None if absent; UserError if malformed."""
    if not os.path.isfile(round_path):
        return None
    advice = ("restore it, or move it away and generate.py starts a new round (this round's images and "
              "scores are then moved to history/ as they are).")
    try:
        current = read_json(round_path)
    except (ValueError, OSError) as error:
        raise UserError(f"{round_path} is not valid JSON ({error}); {advice}") from None
    seeds = current.get("seeds") if isinstance(current, dict) else None
    if not (isinstance(seeds, list) and isinstance(current.get("parameters"), dict)
            and all(type(seed) is int and 0 <= seed < 2**32 for seed in seeds)):
        raise UserError(f'{round_path} is not {{"parameters": {{...}}, "seeds": [whole numbers]}}; {advice}')
    prompts = current.get("prompts", {})
    if not (isinstance(prompts, dict) and all(isinstance(p, str) for p in prompts.values())):
        raise UserError(f'{round_path} has "prompts" that are not {{"<seed>": "prompt"}}; {advice}')
    return current


def same_round(recorded, parameters):
    """Whether the round recorded with `recorded` parameters goes on with `parameters`. One recorded before
    checkpoint hashes were (no "checkpoint_hash") goes on with the file at the same path."""
    if "checkpoint_hash" not in recorded:
        parameters = {name: value for name, value in parameters.items() if name != "checkpoint_hash"}
    return recorded == parameters


def plan_round(settings, parameters):
    """Start or resume the round in sample_path, its seeds (and with a prompt_file their prompts, drawn from
    the parameters' prompt lines) in round.json. Moves an earlier round to history/."""
    folder = settings.sample_path
    rating_files = [os.path.basename(settings.score_path), os.path.basename(settings.comparison_path)]
    # before looking at round.json: it may belong to that half-moved round
    finish_interrupted_archive(folder, rating_files)
    round_path = os.path.join(folder, ROUND_FILE)
    current = read_round(round_path)
    rated = any(os.path.exists(path) for path in (settings.score_path, settings.comparison_path))
    resumable = current and same_round(current["parameters"], parameters) and not rated
    if resumable:
        current["parameters"] = parameters  # a round recorded without the checkpoint's hash gains it
    else:
        moved = archive_round(folder, rating_files)
        if moved:
            print(f"moved the earlier round to {moved}/")
        current = {"parameters": parameters, "seeds": []}
    seeds = current["seeds"]
    rng, taken = random.SystemRandom(), set(seeds)
    while len(seeds) < settings.generate_sample_size:
        seed = rng.randrange(2**31)
        if seed not in taken:
            seeds.append(seed)
            taken.add(seed)
    if settings.prompt_file:  # without one, round.json stays as it always was
        prompts = current.setdefault("prompts", {})
        for seed in seeds:
            prompts.setdefault(str(seed), prompt_for_seed(parameters["prompt_lines"], seed))
    write_json_atomic(round_path, current)


def stop_at_non_finite(settings, lora, seeds):
    """A pipeline callback_on_step_end that stops the batch of `seeds` at the first NaN or infinite latent,
    before anything of it is written: a checkpoint (or LoRA) with such weights makes only black images."""
    def check(pipeline, step, timestep, tensors):
        if not torch.isfinite(tensors["latents"]).all():
            suspects = f"{settings.checkpoint_path} or of the LoRA {lora}" if lora else settings.checkpoint_path
            raise UserError(f"the latents of seeds {seeds} became NaN or infinite at DDIM step {step + 1}: the weights "
                            f"of {suspects} are not finite (a damaged file or a broken merge), so no image of this "
                            f"batch was written; use another checkpoint{' or --generate_lora=none' if lora else ''}.")
        return tensors
    return check


def batch_prompts(prompts, negative_prompt):
    """The pipeline's prompt arguments for a batch with these prompts, one per image: one prompt encoded once
    for all (as with the single prompt setting, so a one-line prompt_file makes the same images), else a list."""
    if len(set(prompts)) == 1:
        return {"prompt": prompts[0], "negative_prompt": negative_prompt, "num_images_per_prompt": len(prompts)}
    return {"prompt": prompts, "negative_prompt": [negative_prompt] * len(prompts), "num_images_per_prompt": 1}


def save_image(folder, seed, image, latent, parameters_text, family):
    """Latent first, PNG last and renamed into place: a PNG on disk means the image is complete."""
    save_latent(latent_file(folder, f"{seed}.png"), latent, family)
    crash_point("generate.latent_saved")
    info = PngInfo()
    info.add_text("parameters", parameters_text)
    with writing(os.path.join(folder, f"{seed}.png")) as temp_path:
        image.save(temp_path, format="PNG", pnginfo=info)


def main(settings):
    state = PartialState(cpu=settings.device == "cpu")
    # one writer per samples folder (the main process speaks for all of an accelerate launch's processes)
    with folder_lock(settings.sample_path, "generate") if state.is_main_process else contextlib.nullcontext():
        generate(settings, state)


def generate(settings, state):
    lora = resolve_lora(settings)
    lines = prompt_lines(settings)  # a malformed prompt_file fails here, before the model is loaded
    dtype = torch.float16 if state.device.type == "cuda" else torch.float32
    pipeline = load_pipeline(settings.checkpoint_path, state.device, dtype, settings.checkpoint_config)
    if settings.prompt_file:
        check_token_lengths(settings.prompt_file, text_tokenizers(pipeline))
    lora_name = None
    if lora:
        load_lora_into_pipeline(pipeline, lora)
        lora_name = ui_lora_name(lora)
    if state.is_main_process:
        print(f"LoRA: {lora}" if lora else "LoRA: none (base model)")
        if settings.prompt_file:
            print(f"prompts: {len(lines)} lines of {settings.prompt_file}, each image's drawn by its seed")
    if settings.generate_vae_slicing:
        pipeline.vae.enable_slicing()
    if settings.generate_vae_tiling:
        pipeline.vae.enable_tiling()

    # ---------------------------------------------------------------- PLAN: which seeds this round still needs
    if state.is_main_process:
        plan_round(settings, round_parameters(settings, lora, lines))
    state.wait_for_everyone()
    current = read_round(os.path.join(settings.sample_path, ROUND_FILE))
    seeds = current["seeds"][: settings.generate_sample_size]
    prompt_of = {seed: current["prompts"][str(seed)] if settings.prompt_file else settings.prompt for seed in seeds}
    done = set(round_images(settings.sample_path))
    missing = [s for s in seeds if f"{s}.png" not in done]
    if state.is_main_process:
        print(f"round: {len(seeds) - len(missing)} of {len(seeds)} images already made, generating {len(missing)}")

    # ---------------------------------------------------------------- GENERATION
    model_name, model_hash = model_identity(settings.checkpoint_path)
    with state.split_between_processes(missing) as my_seeds:
        bar = tqdm(total=len(my_seeds), desc="generating", unit="img", disable=not state.is_main_process)
        for start in range(0, len(my_seeds), settings.generate_batch_size):
            batch = my_seeds[start:start + settings.generate_batch_size]
            with torch.no_grad():
                latents = pipeline(
                    **batch_prompts([prompt_of[s] for s in batch], settings.negative_prompt), height=settings.height,
                    width=settings.width, num_inference_steps=settings.num_inference_steps,
                    guidance_scale=settings.guidance_scale, eta=settings.eta,
                    generator=[torch.Generator().manual_seed(s) for s in batch], output_type="latent",
                    callback_on_step_end=stop_at_non_finite(settings, lora, batch),
                ).images  # (batch, 4, h/8, w/8)
                images = decode_latents(pipeline, latents)
            for seed, image, latent in zip(batch, images, latents):
                text = webui_parameters(prompt_of[seed], settings.negative_prompt, settings.num_inference_steps,
                                        settings.guidance_scale, seed, settings.width, settings.height, settings.eta,
                                        model_name, lora_name, model_hash)
                save_image(settings.sample_path, seed, image, latent, text, model_family(pipeline))
            bar.update(len(batch))
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"done: {len(seeds)} images in {settings.sample_path}; rate them with `python score.py`")


if __name__ == "__main__":
    run_stage(main, USED_SETTINGS)
