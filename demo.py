"""The whole loop on a tiny model, rated by a script that likes bright images: no download, no GPU.

    python demo.py [--name=value ...]      (settings are passed on to every stage, e.g. --device=cpu)
    python demo.py --prompt_file=docs/example-prompts.txt      (the loop on a list of prompts, docs/prompt-sets.md)

Builds a tiny SD1.5-shaped checkpoint (tools/tiny_checkpoint.py) in demo/checkpoint, then runs the
real stage scripts for two rounds, as you would, with a scripted rater in your place:

    generate.py -> rate (brighter = better) -> train_reward.py -> train_policy.py -> generate.py with the LoRA -> ...

and prints the rater's mean score of every round's fresh samples (new random seeds, none of them
trained on). It rises because the policy learned what the reward model learned from the ratings.
The rater maps brightness to a score with a fixed rule calibrated on the first round
(demo/rater_calibration.json), so scores of later rounds compare with the first. Like a person
in a hurry, it rates only RATINGS_PER_ROUND of each round's images: "most informative first", as
the rating page orders them (the reward ensemble's disagreement, samples/rating_order.json), once
there is a reward model to order by; the first round in seed order. Its scores of every image of a
round are only the measurement.

Everything is written under demo/ (checkpoint/, samples/, models/ and outputs/ with their metrics,
plots and previews, summary.json); your models/, samples/ and outputs/ are never touched. A rerun
starts demo/ afresh: it removes what the last run made (listed in demo/.almostperfect_demo) and
nothing else, so files you put in demo/ stay. About 2 minutes on 2 idle CPU cores.
"""

import contextlib
import json
import os
import subprocess
import sys
import time

from tools.scripted_rater import brightness_values, calibration_of, scores_from_values
from utils.cli import images_per_epoch, parse_settings, stage_paths
from utils.errors import UserError
from utils.files import read_json, write_json_atomic
from utils.prompts import prompt_lines
from utils.ratings import read_rating_order, update_rating_order
from utils.reward_files import reward_model_metadata
from utils.samples import ROUND_FILE, round_images

ROOT = os.path.dirname(os.path.abspath(__file__))
MARKER = ".almostperfect_demo"  # in a demo folder: the files the demo made there, which a rerun removes
ROUNDS = 2
POLICY_EPOCHS_PER_ROUND = 5
REQUIRED_RISE = 0.5  # in standard deviations of the first round's scores
RATINGS_PER_ROUND = 48  # of the round's 96 images; the demo rated all 96 before the reward ensemble and ranking loss
# The tiny model's own settings; config.py's defaults stay upstream's (made for SD1.5 on a GPU).
DEMO_SETTINGS = {
    "height": 64, "width": 64,  # the smallest size the reward CNN takes (8x8 latents)
    "generate_sample_size": 96, "generate_batch_size": 16,  # ratings per round; 20% of them test the reward model
    "train_reward_num_epochs": 30, "train_reward_batch_size": 16, "train_reward_test_split_ratio": 0.2,
    "train_reward_loss": "ranking",  # with the 4-CNN ensemble, tools/benchmark_ratings.py's best for few ratings
    "lora_rank": 4,
    "train_sample_batch_size": 16, "train_sample_num_batches_per_epoch": 2,
    "train_policy_batch_size": 32,  # one optimizer step per epoch on all of its images
    "train_policy_learning_rate": 1e-2,  # the tiny UNet needs larger steps than SD1.5
    "train_save_freq": POLICY_EPOCHS_PER_ROUND,
    "train_preview_seeds": "0,1,2,3,4,5,6,7",
}


def demo_settings(folder):
    """--name=value settings of every stage: DEMO_SETTINGS with all paths inside `folder`."""
    return {**stage_paths(folder, os.path.join(folder, "checkpoint")), **DEMO_SETTINGS}


def _entries(folder):
    """Relative paths of every file, link and folder under `folder`, but the marker."""
    found = set()
    for root, folders, files in os.walk(folder):
        found.update(os.path.relpath(os.path.join(root, name), folder) for name in folders + files)
    return found - {MARKER}


def _is_inside(relative_path):
    """Whether a path listed in the marker names something inside the folder (a hand-edited marker cannot
    make the demo delete anything outside it)."""
    path = os.path.normpath(relative_path)  # TypeError if it is not a path
    return not os.path.isabs(path) and path != "." and path.split(os.sep)[0] != ".."


def prepare_folder(folder):
    """The demo folder with nothing of an earlier demo run in it: what that run listed in MARKER as its own is
    removed, anything else (a person's files) stays. A non-empty folder without the marker is refused.

    Returns record_made(), which lists in MARKER everything that appeared in the folder since: the demo's own.
    """
    marker = os.path.join(folder, MARKER)
    if os.path.isdir(folder) and os.listdir(folder):
        if not os.path.isfile(marker):
            raise SystemExit(f"error: {folder} exists and is not a demo folder; move it or pick another.")
        try:
            made = [path for path in read_json(marker)["made"] if _is_inside(path)]
        except (OSError, ValueError, TypeError, KeyError):
            raise SystemExit(f"error: {marker} does not list the demo's files (an older demo.py made {folder}); "
                             "move that folder away or delete it yourself.") from None
        for path in sorted(made, key=lambda p: p.count(os.sep), reverse=True):  # a folder's files before it
            full = os.path.join(folder, path)
            if os.path.isdir(full) and not os.path.islink(full):
                with contextlib.suppress(OSError):  # not empty: it holds a person's files
                    os.rmdir(full)
            elif os.path.lexists(full):
                os.unlink(full)
    os.makedirs(folder, exist_ok=True)
    theirs = _entries(folder)

    def record_made():
        write_json_atomic(marker, {"made": sorted(_entries(folder) - theirs)})

    record_made()
    return record_made


def run_script(script, settings, extra_args=(), record_made=lambda: None):
    """Run a stage script as a user would (its output goes to the console); returns its seconds.

    `record_made` (prepare_folder's) lists what the stage wrote as the demo's, even if it fails or is interrupted.
    """
    args = [f"--{name}={value}" for name, value in settings.items()] + list(extra_args)
    print(f"\n$ python {script} {' '.join(args)}", flush=True)
    started = time.perf_counter()
    try:
        subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, check=True)
    finally:
        record_made()
    return time.perf_counter() - started


def images_to_rate(settings, count):
    """The round's first `count` images in the rating page's "most informative first" order, if the reward
    model can order them (an ensemble), else in seed order."""
    folder = settings["sample_path"]
    update_rating_order(folder, settings["reward_model_path"])  # as score.py does at start
    predictions = read_rating_order(folder)
    if predictions and max(entry["std"] for entry in predictions) > 0:
        return [entry["file"] for entry in predictions][:count]
    return round_images(folder)[:count]


def rate(settings, calibration, ratings_per_round):
    """The scripted rater: writes scores.json with `ratings_per_round` of the round's images.

    Returns (values, scores, seeds, rated): the brightness and score of every image (the measurement).
    """
    folder = settings["sample_path"]
    values = brightness_values(folder)
    scores = scores_from_values(values, calibration)
    rated = images_to_rate(settings, ratings_per_round)
    write_json_atomic(settings["score_path"], {name: scores[name] for name in rated})
    with open(os.path.join(folder, ROUND_FILE)) as f:
        seeds = json.load(f)["seeds"]
    return values, scores, seeds, rated


def policy_seeds(settings, last_epoch):
    """Every seed train_policy.py sampled in epochs 1..last_epoch, to show the fresh ones are fresh."""
    from train_policy import image_seeds

    return {s for epoch in range(1, last_epoch + 1)
            for s in image_seeds(settings.seed, epoch, images_per_epoch(settings))}


def mean_std(values):
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


def run_demo(folder, rounds=ROUNDS, epochs_per_round=POLICY_EPOCHS_PER_ROUND, extra_args=(),
             ratings_per_round=RATINGS_PER_ROUND):
    """Build the tiny checkpoint and run `rounds` rounds of the loop in `folder`; returns the summary."""
    from tools.tiny_checkpoint import build_tiny_checkpoint

    started = time.perf_counter()
    settings = demo_settings(folder)
    stage_settings = parse_settings([f"--{name}={value}" for name, value in settings.items()] + list(extra_args))
    record_made = prepare_folder(folder)
    build_tiny_checkpoint(settings["checkpoint_path"])
    record_made()
    calibration, measured = None, []
    for round_number in range(1, rounds + 2):  # the last generation only measures the final LoRA
        seconds = {"generate": run_script("generate.py", settings, extra_args, record_made)}
        values, scores, seeds, rated = rate(settings, calibration, ratings_per_round)
        if calibration is None:
            calibration = calibration_of(values)
            write_json_atomic(os.path.join(folder, "rater_calibration.json"),
                              {"rule": "score = clip(round(2 * (brightness - mean) / std), -5, 5)", **calibration})
        epochs_before = (round_number - 1) * epochs_per_round
        score_mean, score_std = mean_std(list(scores.values()))
        record = {"round": round_number, "lora_epochs": epochs_before, "images": len(scores), "ratings": len(rated),
                  "brightness_mean": mean_std(list(values.values()))[0], "score_mean": score_mean,
                  "score_std": score_std,
                  "seeds_trained_on": len(set(seeds) & policy_seeds(stage_settings, epochs_before))}
        if round_number <= rounds:
            seconds["train_reward"] = run_script("train_reward.py", settings, extra_args, record_made)
            metadata = reward_model_metadata(settings["reward_model_path"])
            record["reward_model_test_pearson"] = metadata.get("test_pearson")
            seconds["train_policy"] = run_script(
                "train_policy.py", {**settings, "train_policy_num_epochs": round_number * epochs_per_round}, extra_args,
                record_made)
        record["seconds"] = seconds
        measured.append(record)

    before, after = measured[0], measured[-1]
    rise = after["score_mean"] - before["score_mean"]
    summary = {
        "rounds": measured, "score_before": before["score_mean"], "score_after": after["score_mean"], "rise": rise,
        "rise_in_first_round_std": rise / before["score_std"] if before["score_std"] else float("inf"),
        "required_rise_in_std": REQUIRED_RISE, "seconds": time.perf_counter() - started, "settings": settings,
    }
    summary["learned"] = summary["rise_in_first_round_std"] >= REQUIRED_RISE
    summary["ratings_used"] = sum(r["ratings"] for r in measured[:rounds])
    write_json_atomic(os.path.join(folder, "summary.json"), summary)
    record_made()
    return summary


def print_summary(summary, folder):
    print("\n" + "=" * 78)
    print("The rater's scores of fresh samples (-5..5, brighter = better; each round new random seeds)\n")
    print(f"{'round':>5}  {'model':<22} {'images':>6} {'rated':>5}  {'brightness':>10}  {'score':>13}  "
          f"{'reward model r':>14}")
    for record in summary["rounds"]:
        model = f"LoRA, {record['lora_epochs']} epochs" if record["lora_epochs"] else "base (no LoRA)"
        pearson = record.get("reward_model_test_pearson")
        rated = record["ratings"] if record.get("reward_model_test_pearson") is not None else "-"
        print(f"{record['round']:>5}  {model:<22} {record['images']:>6} {rated:>5}  "
              f"{record['brightness_mean']:>10.1f}  "
              f"{record['score_mean']:>+6.2f} ± {record['score_std']:<4.2f}  "
              f"{'' if pearson is None else f'{pearson:.2f}':>14}")
    trained_on = sum(r["seeds_trained_on"] for r in summary["rounds"])
    print(f"\nmean score {summary['score_before']:+.2f} -> {summary['score_after']:+.2f}: a rise of "
          f"{summary['rise']:+.2f} = {summary['rise_in_first_round_std']:.2f} standard deviations of the first "
          f"round's scores (needed: {summary['required_rise_in_std']}) -> "
          + ("the loop learned the rater's taste." if summary["learned"] else "NOT LEARNED."))
    print(f"The reward models learned from {summary['ratings_used']} ratings in all. "
          f"{trained_on} of the measured images used a seed the policy was trained on. "
          f"Took {summary['seconds'] / 60:.1f} minutes.")
    print(f"\nLook at: {folder}/outputs/preview_epoch_*.png (fixed seeds at each save), "
          f"{folder}/outputs/policy_metrics.png,\n         {folder}/models/reward_metrics.png, "
          f"{folder}/samples/ and its history/; all figures in {folder}/summary.json")


def absolute_prompt_file(arg):
    """--prompt_file=path relative to where the demo was started, since the stages run in the repository."""
    name, _, path = arg.partition("=")
    return f"{name}={os.path.abspath(path)}" if name == "--prompt_file" and path else arg


def main():
    extra_args = [absolute_prompt_file(arg) for arg in sys.argv[1:]]
    try:  # a mistyped setting or a bad prompt file fails here, before the demo folder is touched
        prompt_lines(parse_settings(extra_args))
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    folder = os.path.join(ROOT, "demo")
    summary = run_demo(folder, extra_args=extra_args)
    print_summary(summary, os.path.relpath(folder))
    sys.exit(0 if summary["learned"] else 1)


if __name__ == "__main__":
    main()
