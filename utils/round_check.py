"""The next round checks the last: does the previous reward model still agree with the person on the LoRA's images?

A LoRA trained against a reward model finds where that model is wrong as readily as where it is right
(reward hacking). The person's ratings of the next round, made with that LoRA, are the one honest
measurement of which it did: train_reward.py calls check_previous_reward_model before it overwrites
the model, and it compares the old model's agreement with these new ratings to the agreement it had
on held-out ratings of its own round (saved in its metadata).
"""

import os

import torch

from ddpo.statistics import pairwise_accuracy, spearman
from utils.errors import UserError
from utils.files import read_json
from utils.metrics import append_jsonl
from utils.ratings import scores_format_problem
from utils.reward_files import load_reward_model, reward_model_metadata
from utils.samples import ROUND_FILE, latent_file, lives_in, load_latent, parse_webui_parameters, read_png_parameters

MIN_RATINGS = 10  # fewer new ratings than this say nothing about agreement
MIN_DROP = 0.2  # a Spearman drop smaller than this is not "clear", however many ratings


def round_lora(folder, names):
    """The LoRA the round's images were made with: round.json's "lora", else a <lora:NAME> tag in an image's
    generation parameters (images made in WebUI); None for the base model."""
    try:
        lora = read_json(os.path.join(folder, ROUND_FILE))["parameters"].get("lora")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        lora = None
    for name in names if not lora else ():
        try:
            parameters = read_png_parameters(os.path.join(folder, name))
        except OSError:
            continue
        loras = parse_webui_parameters(parameters)["loras"] if parameters else []
        if loras:
            return loras[0][0]
    return lora


def clear_drop(held_out, now, ratings):
    """A drop beyond MIN_DROP and beyond two standard errors of a Spearman on `ratings` images (about 1/sqrt(n - 1))."""
    return held_out is not None and held_out - now > max(MIN_DROP, 2 / (ratings - 1) ** 0.5)


def check_previous_reward_model(settings, device="cpu"):
    """Score the current round's rated LoRA images with the reward model still at reward_model_path; print
    and log (models/reward_metrics.jsonl) its agreement with the person next to its held-out agreement.

    Returns the logged record, or None when there is nothing to check: no previous model, a round of the
    base model, too few rated images with saved latents, or latents of another size than the model learned.
    """
    path = settings.reward_model_path
    if not os.path.isfile(path) or not os.path.isfile(settings.score_path):
        return None
    try:
        scores = read_json(settings.score_path)
    except (OSError, ValueError):
        return None  # train_reward's own reading says what is wrong with the file
    if scores_format_problem(scores):
        return None
    folder = settings.sample_path
    rated = [name for name in scores if lives_in(folder, name) and os.path.isfile(latent_file(folder, name))]
    lora = round_lora(folder, rated)
    if not lora or len(rated) < MIN_RATINGS:
        return None
    try:
        metadata = reward_model_metadata(path)
        latents = torch.stack([load_latent(latent_file(folder, name)) for name in rated])  # (n, 4, h/8, w/8)
        if metadata.get("latent_shape") and list(latents.shape[1:]) != metadata["latent_shape"]:
            return None
        with torch.no_grad():
            predicted = load_reward_model(path, device)(latents.to(device)).cpu()
    except UserError as error:  # the training that follows replaces the file, or names the latent that is bad
        print(f"note: the previous reward model was not checked against your new ratings: {error}")
        return None
    person = torch.tensor([float(scores[name]) for name in rated])
    held_out = metadata.get("test_spearman")
    record = {"check": "previous reward model on the LoRA's images", "lora": os.path.basename(str(lora)),
              "ratings": len(rated), "spearman": spearman(predicted, person),
              "pairwise_accuracy": pairwise_accuracy(predicted, person), "held_out_spearman": held_out}
    record["blind_spots_found"] = clear_drop(held_out, record["spearman"], len(rated))
    append_jsonl(os.path.join(settings.model_path, "reward_metrics.jsonl"), record)
    print(check_message(record))
    return record


def check_message(record):
    held_out = record["held_out_spearman"]
    line = (f"the previous reward model on your {record['ratings']} ratings of images made with {record['lora']}: "
            f"Spearman {record['spearman']:.2f}, pairwise accuracy {record['pairwise_accuracy']:.2f}"
            + (f" (on held-out ratings of its own round: Spearman {held_out:.2f})" if held_out is not None else ""))
    if record["blind_spots_found"]:
        line += ("\nwarning: it agrees with you clearly less on the LoRA's images than on its own round's: the LoRA "
                 "found the reward model's blind spots. Consider an earlier LoRA (outputs/*_epoch_N, the epoch whose "
                 "previews looked best) for the next round, rather than the last one.")
    return line
