"""Rating efficiency: how well the reward model learns a taste from N ratings, for several tastes and ways to rate.

    python -m tools.benchmark_ratings             # docs/rating-efficiency.md's figures: about 15 min on 2 busy cores
    python -m tools.benchmark_ratings --tastes greenness,blueness,bright_centre,sharpness --methods baseline,recommended
    python -m tools.benchmark_ratings --seeds 1 --sizes 50,300 --tastes brightness --methods baseline,recommended
    python -m tools.benchmark_ratings --seeds 1 --methods baseline,ranking,ensemble,batch_32,recommended,comparisons

Scripted raters stand in for people (tools/scripted_rater.py): each likes one thing in an image (brightness,
redness, contrast, saturation, a top-heavy image; and, to check the recommendation on tastes it was not chosen
on, `--tastes greenness,blueness,bright_centre,sharpness`) and rates as a person does, with a point of jitter
and an occasional rating that is not what they think. For each taste, method and number of ratings, the reward model
is trained with train_reward's own code (ddpo/reward_training.fit_reward_model) on that many ratings of a
pool of images, and measured on held-out images against the rater's noiseless taste: Spearman correlation and
pairwise accuracy, mean and spread (std) over seeds. A comparison counts as one rating, as a score does.

Methods (`baseline` is upstream's train_reward, `recommended` the few_ratings recipe of train_reward_recipe):
  baseline      random images, scores; MSE, one CNN, batches of 100: upstream's settings
  ranking       the baseline with the ranking loss on scores instead of MSE
  ensemble      the baseline with an ensemble of 4 CNNs (their mean is the reward)
  batch_32      the baseline with batches of 32 (more optimizer steps from few ratings)
  recommended   all three and AdamW at 3e-3 (each CNN holds out a different 10%): random images, scores
  no_split      recommended with nothing held out: every CNN trains on every rating, but there are no test metrics
  active        recommended; after the first ratings, the next images are those the members disagree on most
  comparisons   pairs instead of scores (Bradley–Terry); random pairs
  active_pairs  pairs the ensemble's members disagree on most (the rating page's pairwise mode)

The images are made once with generate.py on the tiny checkpoint and cached in bench/rating_cache/ (about a
minute); results go to bench/results/ratings.json and the plot to bench/results/ratings.png.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

import train_reward
from ddpo.rating_order import image_predictions, next_pairs
from ddpo.reward_model import member_scores
from ddpo.reward_training import OUTCOMES, Ratings, fit_reward_model, predict
from ddpo.statistics import pairwise_accuracy, spearman
from tools.scripted_rater import TASTES, TUNED_ON, NoisyRater, calibration_of, taste_values
from utils.cli import parse_settings
from utils.files import write_json_atomic
from utils.metrics import save_figure
from utils.samples import latent_file, load_latent, round_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where generate.py and bench/ are
CACHE = os.path.join(ROOT, "bench", "rating_cache")
POOL, HELD_OUT = 1000, 400  # images to rate, images to measure on (never rated)
SIZES = [50, 100, 200, 300]
BASELINE_SIZES = [1000]  # the baseline also at upstream's 1000 ratings per round: the target to reach
TARGET_SIZE = 300  # the target: at most this many ratings reach the baseline's Spearman at its most ratings

SEED_SETTINGS = {"train_reward_loss": "mse", "train_reward_ensemble_size": 1, "train_reward_batch_size": 100}
RECOMMENDED = {"train_reward_loss": "ranking", "train_reward_ensemble_size": 4, "train_reward_batch_size": 32,
               "train_reward_learning_rate": 3e-3}  # and the default split: each CNN holds out its own 10%
METHODS = {  # name: (train_reward settings, which ratings: "random" or "active", kind: "scores" or "pairs")
    "baseline": (SEED_SETTINGS, "random", "scores"),
    "ranking": ({**SEED_SETTINGS, "train_reward_loss": "ranking"}, "random", "scores"),
    "ensemble": ({**SEED_SETTINGS, "train_reward_ensemble_size": 4}, "random", "scores"),
    "batch_32": ({**SEED_SETTINGS, "train_reward_batch_size": 32}, "random", "scores"),
    "recommended": (RECOMMENDED, "random", "scores"),
    "no_split": ({**RECOMMENDED, "train_reward_test_split_ratio": 0.0}, "random", "scores"),
    "active": (RECOMMENDED, "active", "scores"),
    "comparisons": (RECOMMENDED, "random", "pairs"),
    "active_pairs": (RECOMMENDED, "active", "pairs"),
}

DEFAULT_METHODS = ["baseline", "recommended", "no_split", "active", "active_pairs"]  # the others: --methods=...


# ---------------------------------------------------------------- the images, made once

def cached_round():
    """(names, latents (n, 4, 8, 8), {taste: values (n,)}) of the cached round; made with generate.py if missing."""
    samples = os.path.join(CACHE, "samples")
    if len(round_images(samples)) < POOL + HELD_OUT:
        from tools.tiny_checkpoint import build_tiny_checkpoint

        checkpoint = os.path.join(CACHE, "checkpoint")
        if not os.path.isfile(os.path.join(checkpoint, "model_index.json")):
            build_tiny_checkpoint(checkpoint)
        print(f"making {POOL + HELD_OUT} images with generate.py on the tiny checkpoint in {samples} (once)")
        subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), f"--checkpoint_path={checkpoint}",
                        f"--sample_path={samples}", f"--score_path={os.path.join(samples, 'scores.json')}",
                        f"--lora_path={os.path.join(CACHE, 'outputs')}", "--generate_lora=none", "--device=cpu",
                        "--height=64", "--width=64", f"--generate_sample_size={POOL + HELD_OUT}",
                        "--generate_batch_size=16"], check=True)
    names = round_images(samples)[:POOL + HELD_OUT]
    tastes_file = os.path.join(CACHE, "tastes.json")
    if os.path.isfile(tastes_file):
        with open(tastes_file) as f:
            values = json.load(f)
    if (not os.path.isfile(tastes_file) or set(values) != set(TASTES)
            or any(n not in values["brightness"] for n in names)):
        values = taste_values(samples, tuple(TASTES), names)
        write_json_atomic(tastes_file, values)
    latents = torch.stack([load_latent(latent_file(samples, n)) for n in names])
    return names, latents, {taste: np.array([values[taste][n] for n in names]) for taste in TASTES}


# ---------------------------------------------------------------- one run: a taste, a method, a seed

def settings_for(overrides, seed):
    settings = parse_settings(["--device=cpu", f"--seed={seed}"], train_reward.USED_SETTINGS)
    for name, value in overrides.items():
        setattr(settings, name, value)
    return settings


def train(settings, ratings):
    """train_reward's own training, in-process: its split, its loop, its best-epoch choice."""
    torch.manual_seed(settings.seed)
    model, _ = fit_reward_model(settings, ratings)
    return model


def measure(model, latents, truth):
    predicted = predict(model, latents, 256)
    truth = torch.as_tensor(truth)
    return {"spearman": spearman(predicted, truth), "pairwise_accuracy": pairwise_accuracy(predicted, truth)}


def run(method, pool_latents, pool_values, test_latents, test_values, sizes, seed):
    """{size: {"spearman", "pairwise_accuracy"}} of one method on one taste with one seed."""
    overrides, selection, kind = METHODS[method]
    settings = settings_for(overrides, seed)
    rng = np.random.default_rng(seed)
    rater = NoisyRater(calibration_of(dict(enumerate(pool_values))), rng)
    order = list(rng.permutation(len(pool_values)))  # the random order; active methods reorder what is left
    results, model = {}, None
    chosen, given, pairs, outcomes = [], {}, [], []  # chosen images and their scores; pairs and their answers
    for size in sizes:
        if kind == "scores":
            rest = [i for i in order if i not in given]
            if selection == "active" and model is not None:
                with torch.no_grad():
                    spread = member_scores(model, pool_latents[rest]).std(0)  # (len(rest),)
                rest = [rest[i] for i in torch.argsort(spread, descending=True).tolist()]
            new = rest[:size - len(chosen)]
            given |= rater.scores({i: pool_values[i] for i in new})  # each image rated once
            chosen += new
            ratings = Ratings.of_scores(pool_latents[chosen], torch.tensor([given[i] for i in chosen]))
        else:
            predictions = None
            if selection == "active" and model is not None:
                with torch.no_grad():
                    predictions = image_predictions(list(range(len(pool_values))), member_scores(model, pool_latents))
            new = next_pairs(list(range(len(pool_values))), predictions, [{"a": a, "b": b} for a, b in pairs],
                             set(), rng, count=size - len(pairs))
            pairs += new
            outcomes += [OUTCOMES[rater.compare(pool_values[a], pool_values[b])] for a, b in new]
            ratings = Ratings(pool_latents, torch.zeros(0, dtype=torch.long), torch.zeros(0),
                              torch.tensor(pairs, dtype=torch.long), torch.tensor(outcomes, dtype=torch.float32))
        model = train(settings, ratings)
        results[size] = measure(model, test_latents, test_values)
    return results


# ---------------------------------------------------------------- the runs, in worker processes

ROUND = None  # each worker's copy of cached_round(): (names, latents, {taste: values})


def load_round():
    global ROUND
    torch.set_num_threads(1)  # the CNN is small: a process per core beats threads fighting over them
    ROUND = cached_round()


def run_task(taste, method, seed, sizes):
    """(run's results, seconds) of one taste, method and seed, in a worker process."""
    started = time.perf_counter()
    _, latents, values = ROUND
    pool, held_out = slice(0, POOL), slice(POOL, POOL + HELD_OUT)
    results = run(method, latents[pool], values[taste][pool], latents[held_out], values[taste][held_out], sizes, seed)
    return results, time.perf_counter() - started


# ---------------------------------------------------------------- summary, plot

def summarise(runs):
    """{size: {metric: [values over seeds]}} -> {size: {metric: mean, metric_std: std}}"""
    summary = {}
    for size in sorted({s for r in runs for s in r}):
        values = {m: [r[size][m] for r in runs if size in r] for m in ("spearman", "pairwise_accuracy")}
        summary[size] = {**{m: float(np.mean(v)) for m, v in values.items()},
                         **{f"{m}_std": float(np.std(v)) for m, v in values.items()}}
    return summary


def targets(results, goal_size):
    """Per taste: the baseline's Spearman at `goal_size` ratings, and each method's fewest ratings that reach it."""
    table = {}
    for taste, methods in results.items():
        goal = methods.get("baseline", {}).get(str(goal_size), {}).get("spearman")
        if goal is None:
            continue
        reached = {method: min((int(s) for s, v in by_size.items() if v["spearman"] >= goal), default=None)
                   for method, by_size in methods.items()}
        table[taste] = {"baseline_ratings": goal_size, "baseline_spearman": goal, "fewest_ratings_to_reach_it": reached,
                        f"met_with_at_most_{TARGET_SIZE}": {m: r is not None and r <= TARGET_SIZE
                                                            for m, r in reached.items()}}
    return table


def plot(path, results, goal_size):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tastes = list(results)
    figure, axes = plt.subplots(2, len(tastes), figsize=(4 * len(tastes), 7), squeeze=False)
    for column, taste in enumerate(tastes):
        goal = results[taste].get("baseline", {}).get(str(goal_size), {}).get("spearman")
        for row, metric in enumerate(("spearman", "pairwise_accuracy")):
            axis = axes[row][column]
            for method, by_size in results[taste].items():
                sizes = sorted(by_size, key=int)
                x = [int(s) for s in sizes]
                y = np.array([by_size[s][metric] for s in sizes])
                band = np.array([by_size[s][f"{metric}_std"] for s in sizes])
                line = axis.plot(x, y, marker="o", markersize=3, label=method)[0]
                axis.fill_between(x, y - band, y + band, color=line.get_color(), alpha=0.15)
            if goal is not None and metric == "spearman":
                axis.axhline(goal, color="black", linestyle="--", linewidth=1, label=f"baseline at {goal_size}")
                axis.axvline(TARGET_SIZE, color="grey", linestyle=":", linewidth=1)
            axis.set_xscale("log")
            axis.set_title(f"{taste}: {metric.replace('_', ' ')}")
            axis.set_xlabel("ratings (a comparison counts as one)")
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(figure, path, "held-out agreement with the rater's noiseless taste (mean ± std over seeds)", dpi=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tastes", default=",".join(TUNED_ON), help=f"any of {', '.join(TASTES)}")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="numbers of ratings")
    parser.add_argument("--baseline_sizes", default=",".join(map(str, BASELINE_SIZES)),
                        help="more numbers of ratings for the baseline only; the largest is the target to reach")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="worker processes (each uses one thread)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "ratings.json"))
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    baseline_sizes = sorted(int(s) for s in args.baseline_sizes.split(","))
    tastes, methods = args.tastes.split(","), args.methods.split(",")
    unknown = [t for t in tastes if t not in TASTES] + [m for m in methods if m not in METHODS]
    if unknown or max(sizes + baseline_sizes) > POOL:
        parser.error(f"unknown {unknown}; tastes are {list(TASTES)}, methods {list(METHODS)}; sizes at most {POOL}")

    started = time.perf_counter()
    cached_round()  # made once here, before the workers read it
    tasks = [(taste, method, seed, sorted(set(sizes + baseline_sizes)) if method == "baseline" else sizes)
             for taste in tastes for method in methods for seed in range(args.seeds)]
    runs, seconds = {}, {}
    with ProcessPoolExecutor(args.jobs, initializer=load_round) as workers:
        futures = [workers.submit(run_task, *task) for task in tasks]
        for task, future in zip(tasks, tqdm(futures, desc="runs", unit="run")):  # in order; they finish about so
            taste, method, _, _ = task
            result, took = future.result()
            runs.setdefault((taste, method), []).append(result)
            seconds[f"{taste}/{method}"] = seconds.get(f"{taste}/{method}", 0.0) + took
    results = {taste: {} for taste in tastes}
    for (taste, method), method_runs in runs.items():
        results[taste][method] = {str(k): v for k, v in summarise(method_runs).items()}
        line = "  ".join(f"{s}: {v['spearman']:.3f}±{v['spearman_std']:.3f}" for s, v in results[taste][method].items())
        tqdm.write(f"{taste:>10} {method:>12} ({seconds[f'{taste}/{method}']:.0f} s)  Spearman  {line}")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    goal_size = max(baseline_sizes)
    report = {"pool": POOL, "held_out": HELD_OUT, "seeds": args.seeds, "methods": {m: METHODS[m] for m in methods},
              "results": results, "targets": targets(results, goal_size), "seconds": seconds,
              "total_seconds": time.perf_counter() - started}
    write_json_atomic(args.out, report)
    plot_path = os.path.splitext(args.out)[0] + ".png"
    plot(plot_path, results, goal_size)
    for taste, row in report["targets"].items():
        print(f"{taste:>10}: baseline Spearman at {goal_size} = {row['baseline_spearman']:.3f}; fewest ratings to "
              f"reach it: " + ", ".join(f"{m} {r}" for m, r in row["fewest_ratings_to_reach_it"].items()))
    print(f"wrote {args.out} and {plot_path} in {report['total_seconds'] / 60:.1f} minutes")


if __name__ == "__main__":
    main()
