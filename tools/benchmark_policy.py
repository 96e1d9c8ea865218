"""Does the policy learn the person's *true* taste, or only the reward model's blind spots? (docs/policy.md)

    nice -n 10 python -m tools.benchmark_policy [--tastes=warmth,coolness] [--methods=upstream,kl] [--seeds=2]
                                                [--epochs=16] [--save_every=4] [--prompt_file=F] [--eval_prompt_file=G]

A scripted rater with a hidden taste (tools/scripted_rater.py TASTES, rating as people do: NoisyRater)
takes the person's place, and the real stages run in worker processes on the tiny checkpoint
(tools/tiny_checkpoint.py), each a (taste, seed) run:

    generate.py (a first round) -> the rater scores it -> train_reward.py -> per method: train_policy.py for
    --epochs, saving every --save_every -> generate.py with each saved LoRA on fresh seeds (the same seeds for
    every epoch and for the base model) -> the TRUE taste and the reward model (the proxy) score them

Per taste and method, by epoch, mean ± std over seeds:
  true gain   (fresh images' mean true value - the base model's on the same seeds) / the first round's std
  proxy gain  the same with the reward model's score (its std over the first round): what the policy was told
  gap         proxy gain - true gain: rising means the LoRA is pleasing the model, not the taste
  KL          the saved LoRA's KL to the base model along its preview images (train_policy's saved_kl_to_base)
Tastes come in opposite pairs (warmth and coolness, brightness and darkness), so drift that pleases no taste
in particular cannot pass for learning; UNTUNED tastes were never looked at while choosing the defaults.

A method is a dict of settings overrides (METHODS): a new guard is one more entry. Results go to
bench/policy.json and the plot (true and proxy gain by epoch, KL below, per taste) to bench/policy.png.
"""

import argparse
import contextlib
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

import generate
import train_policy
import train_reward
from ddpo.reward_model import member_scores
from tools.scripted_rater import TASTES, NoisyRater, calibration_of, taste_values
from utils.cli import parse_settings, stage_paths
from utils.files import write_json_atomic
from utils.lora_files import epoch_files
from utils.metrics import read_jsonl, save_figure
from utils.reward_files import load_reward_model, reward_model_metadata
from utils.samples import ROUND_FILE, latent_file, load_latent, round_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "bench", "policy_runs")  # every run's folders (--work; rewritten by each benchmark run)

TUNED_ON = ("warmth", "coolness", "brightness", "darkness")  # the defaults were chosen looking at these
UNTUNED = ("greenness", "bright_centre")  # and never at these
OPPOSITES = {"warmth": "coolness", "coolness": "warmth", "brightness": "darkness", "darkness": "brightness"}

# The tiny model's settings (as demo.py's, 10 DDIM steps); every stage gets them.
SETTINGS = {
    "device": "cpu", "height": 64, "width": 64, "num_inference_steps": 10, "lora_rank": 4,  # --steps
    "generate_batch_size": 16,
    "train_reward_num_epochs": 30, "train_reward_batch_size": 16, "train_reward_test_split_ratio": 0.2,
    "train_reward_loss": "ranking", "train_reward_ensemble_size": 4,
    "train_sample_batch_size": 16, "train_sample_num_batches_per_epoch": 2, "train_policy_batch_size": 32,
    "train_policy_learning_rate": 1e-2, "train_preview_seeds": "0,1,2,3",
}
METHODS = {  # name: train_policy settings over SETTINGS
    "upstream": {"train_kl_weight": 0.0, "train_reward_pessimism": 0.0},
    "kl": {"train_kl_weight": 0.01, "train_reward_pessimism": 0.0},  # DPOK's for one prompt; 0.1 and 1 froze the LoRA
    "pessimism": {"train_kl_weight": 0.0, "train_reward_pessimism": 1.0},
    "kl_and_pessimism": {"train_kl_weight": 0.01, "train_reward_pessimism": 1.0},
}
DEFAULT_METHODS = ["upstream", "kl", "pessimism"]


# ---------------------------------------------------------------- the stages, in-process

def stage_settings(stage, folder, checkpoint, **overrides):
    """The stage's settings as its command line would give them: every path in `folder`, SETTINGS, overrides."""
    values = {**stage_paths(folder, checkpoint), **SETTINGS, **overrides}
    return parse_settings([f"--{k}={v}" for k, v in values.items()], stage.USED_SETTINGS)


def generate_round(folder, checkpoint, seeds, **overrides):
    """generate.py's round of exactly these seeds in folder/samples (planned in its round.json, which
    generate then completes as an unfinished round). Returns the sample folder."""
    settings = stage_settings(generate, folder, checkpoint, generate_sample_size=len(seeds), **overrides)
    lora = generate.resolve_lora(settings)
    os.makedirs(settings.sample_path, exist_ok=True)
    write_json_atomic(os.path.join(settings.sample_path, ROUND_FILE),
                      {"parameters": generate.round_parameters(settings, lora), "seeds": list(seeds)})
    generate.main(settings)
    return settings.sample_path


def measured(sample_folder, tastes, reward_model):
    """({taste: (n,) true values}, (n,) reward model scores) of a round's images."""
    names = round_images(sample_folder)
    values = taste_values(sample_folder, tastes, names)
    latents = torch.stack([load_latent(latent_file(sample_folder, n)) for n in names])
    with torch.no_grad():
        proxy = member_scores(reward_model, latents).mean(0).numpy() if reward_model is not None else None
    return {t: np.array([values[t][n] for n in names]) for t in tastes}, proxy


# ---------------------------------------------------------------- one run: a taste and a seed, every method

def run(work, taste, seed, methods, epochs, save_every, ratings, eval_images, steps, prompt_file, eval_prompt_file):
    """{method: {"epochs", "true_gain", "proxy_gain", "kl", "opposite_change", "seconds"}, "reward_model": ...}."""
    folder, checkpoint = os.path.join(work, f"{taste}_seed{seed}"), os.path.join(work, "checkpoint")
    shutil.rmtree(folder, ignore_errors=True)  # the benchmark's own: an earlier run's LoRAs would be resumed
    rng = np.random.default_rng(seed)
    tastes = (taste, OPPOSITES[taste]) if taste in OPPOSITES else (taste,)
    prompts = {"prompt_file": prompt_file, "num_inference_steps": steps}
    eval_prompts = {"prompt_file": eval_prompt_file, "num_inference_steps": steps}

    # ---------------------------------------------------------------- the first round, rated
    started = time.perf_counter()
    first_seeds = rng.choice(2**31 - 1, ratings, replace=False).tolist()
    samples = generate_round(folder, checkpoint, first_seeds, generate_lora="none", **prompts)
    names = round_images(samples)
    values = taste_values(samples, (taste,), names)[taste]
    calibration = calibration_of(values)
    write_json_atomic(os.path.join(samples, "scores.json"), NoisyRater(calibration, rng).scores(values))
    train_reward.main(stage_settings(train_reward, folder, checkpoint, seed=seed, **prompts))
    reward_model = load_reward_model(os.path.join(folder, "models", "reward_model.safetensors"))
    _, first_proxy = measured(samples, (), reward_model)
    scales = {"true": calibration["std"], "proxy": float(first_proxy.std()) or 1.0}
    report = {"reward_model": {"test_spearman": _held_out_spearman(folder), "seconds": time.perf_counter() - started}}

    # ---------------------------------------------------------------- the base model on the fresh seeds
    eval_seeds = rng.choice(2**31 - 1, eval_images, replace=False).tolist()
    base_true, base_proxy = measured(generate_round(os.path.join(folder, "eval_base"), checkpoint, eval_seeds,
                                                    generate_lora="none", **eval_prompts), tastes, reward_model)

    for method in methods:
        started = time.perf_counter()
        method_folder = os.path.join(folder, method)
        outputs = os.path.join(method_folder, "outputs")
        train_policy.main(stage_settings(
            train_policy, method_folder, checkpoint, **prompts, **METHODS[method], seed=seed,
            reward_model_path=os.path.join(folder, "models", "reward_model.safetensors"),
            train_policy_num_epochs=epochs, train_save_freq=save_every))
        records = {r["epoch"]: r for r in read_jsonl(os.path.join(outputs, "policy_metrics.jsonl"))}
        row = {"epochs": [0], "true_gain": [0.0], "proxy_gain": [0.0], "kl": [0.0], "opposite_change": [0.0]}
        for epoch in sorted(e for e in records if "saved_kl_to_base" in records[e]):
            lora = epoch_files(outputs, epoch, "")["diffusers"]
            true, proxy = measured(generate_round(os.path.join(method_folder, f"eval_{epoch}"), checkpoint, eval_seeds,
                                                  generate_lora=lora, **eval_prompts), tastes, reward_model)
            row["epochs"].append(epoch)
            row["true_gain"].append(float((true[taste] - base_true[taste]).mean() / scales["true"]))
            row["proxy_gain"].append(float((proxy - base_proxy).mean() / scales["proxy"]))
            row["kl"].append(records[epoch]["saved_kl_to_base"])
            if len(tastes) > 1:  # the opposite taste's value moved by this much, in the same unit
                row["opposite_change"].append(float((true[tastes[1]] - base_true[tastes[1]]).mean() / scales["true"]))
        row["seconds"] = time.perf_counter() - started
        report[method] = row
    return report


def _held_out_spearman(folder):
    return reward_model_metadata(os.path.join(folder, "models", "reward_model.safetensors")).get("test_spearman")


def run_task(args):
    """run() in a worker process, its stages' output in the run's log file; (taste, seed, report, wall seconds)."""
    work, taste, seed = args[:3]
    torch.set_num_threads(1)  # the tiny model: a process per core beats threads fighting over them
    started, cpu_started = time.perf_counter(), time.process_time()
    with open(os.path.join(work, f"{taste}_seed{seed}.log"), "w") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        report = run(*args)
    report["cpu_seconds"] = time.process_time() - cpu_started  # what the run costs on an idle core
    return taste, seed, report, time.perf_counter() - started


# ---------------------------------------------------------------- summary, plot

def summarise(reports, methods):
    """[report per seed] -> {method: {"epochs", metric: means, metric_std: stds}} (gap = proxy - true gain)."""
    summary = {}
    for method in methods:
        rows = [r[method] for r in reports]
        summary[method] = {"epochs": rows[0]["epochs"], "seconds": float(np.mean([r["seconds"] for r in rows]))}
        for metric in ("true_gain", "proxy_gain", "kl", "opposite_change", "gap"):
            per_seed = np.array([np.subtract(r["proxy_gain"], r["true_gain"]) if metric == "gap" else r[metric]
                                 for r in rows], dtype=float)
            if per_seed.shape[1] == len(rows[0]["epochs"]):
                summary[method][metric] = per_seed.mean(0).tolist()
                summary[method][f"{metric}_std"] = per_seed.std(0).tolist()
        summary[method]["true_gain_by_seed"] = [r["true_gain"] for r in rows]
    return summary


def opposite_pairs(results):
    """{"warmth/coolness": {method: {"warmth": last true gain, "coolness": ..., "opposite_directions": bool}}}:
    each gain is in its own taste, so both above 0 means the two LoRAs moved the shared value in opposite ways."""
    pairs = {}
    for first, second in [(a, b) for a, b in OPPOSITES.items() if a < b and a in results and b in results]:
        pairs[f"{first}/{second}"] = {
            method: {first: row["true_gain"][-1], second: results[second]["methods"][method]["true_gain"][-1],
                     "opposite_directions": row["true_gain"][-1] > 0
                     and results[second]["methods"][method]["true_gain"][-1] > 0}
            for method, row in results[first]["methods"].items()}
    return pairs


def plot(path, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tastes = list(results)
    figure, axes = plt.subplots(2, len(tastes), figsize=(max(3.6 * len(tastes), 8), 6.5), squeeze=False)
    for column, taste in enumerate(tastes):
        top, bottom = axes[0][column], axes[1][column]
        for method, row in results[taste]["methods"].items():
            x = row["epochs"]
            line = top.plot(x, row["true_gain"], marker="o", markersize=3, label=f"{method} true")[0]
            top.fill_between(x, np.subtract(row["true_gain"], row["true_gain_std"]),
                             np.add(row["true_gain"], row["true_gain_std"]), color=line.get_color(), alpha=0.15)
            top.plot(x, row["proxy_gain"], linestyle="--", color=line.get_color(), label=f"{method} proxy")
            bottom.plot(x, row["kl"], marker="o", markersize=3, color=line.get_color(), label=method)
        top.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        top.axhline(0.0, color="black", linewidth=0.5)
        top.set_title(f"{taste}{' (untuned)' if taste in UNTUNED else ''}: gain")
        top.set_xlabel("epoch")
        bottom.set_title("KL to the base model")
        bottom.set_xlabel("epoch")
        bottom.set_yscale("symlog", linthresh=1e-4)
        for axis in (top, bottom):
            axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("first-round std (true: solid, proxy: dashed)")
    axes[0][0].legend(fontsize=6)
    save_figure(figure, path, "fresh images' true taste vs the reward model's score, by epoch (mean ± std over seeds)",
                dpi=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tastes", default=",".join(TUNED_ON + UNTUNED), help=f"any of {', '.join(TASTES)}")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=16, help="train_policy epochs (one loop)")
    parser.add_argument("--save_every", type=int, default=4, help="epochs between saved (and measured) LoRAs")
    parser.add_argument("--ratings", type=int, default=64, help="images in the first round, all rated")
    parser.add_argument("--eval_images", type=int, default=32, help="fresh seeds each saved LoRA is measured on")
    parser.add_argument("--steps", type=int, default=SETTINGS["num_inference_steps"], help="DDIM steps per image")
    parser.add_argument("--prompt_file", default="", help="the prompts of the rated round and of training")
    parser.add_argument("--eval_prompt_file", default="",
                        help="held-out prompts of the true-taste measurement ('' = the plain prompt setting)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "policy.json"))
    parser.add_argument("--work", default=WORK, help="the runs' folders (cleared run by run)")
    args = parser.parse_args()
    tastes, methods = args.tastes.split(","), args.methods.split(",")
    unknown = [t for t in tastes if t not in TASTES] + [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown {unknown}; tastes are {list(TASTES)}, methods {list(METHODS)}")
    for path in (args.prompt_file, args.eval_prompt_file):
        if path and not os.path.isfile(path):
            parser.error(f"{path} is not a file")

    started = time.perf_counter()
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    checkpoint = os.path.join(work, "checkpoint")
    if not os.path.isfile(os.path.join(checkpoint, "model_index.json")):
        from tools.tiny_checkpoint import build_tiny_checkpoint

        build_tiny_checkpoint(checkpoint)
    prompt_files = [os.path.abspath(p) if p else "" for p in (args.prompt_file, args.eval_prompt_file)]
    tasks = [(work, taste, seed, methods, args.epochs, args.save_every, args.ratings, args.eval_images, args.steps,
              *prompt_files)
             for seed in range(args.seeds) for taste in tastes]
    reports, seconds = {taste: [] for taste in tastes}, {taste: 0.0 for taste in tastes}
    with ProcessPoolExecutor(args.jobs) as workers:
        for taste, seed, report, took in tqdm(workers.map(run_task, tasks), total=len(tasks), desc="runs"):
            reports[taste].append(report)
            seconds[taste] += took
            tqdm.write(f"{taste:>13} seed {seed} ({took:.0f} s): true gain at the last epoch " + ", ".join(
                f"{m} {report[m]['true_gain'][-1]:+.2f} (proxy {report[m]['proxy_gain'][-1]:+.2f})" for m in methods))
            results = write_report(args, methods, reports, seconds, started)  # so far: a long run can be stopped
    print_table(results, methods)
    cpu_minutes = sum(r["cpu_seconds"] for rs in reports.values() for r in rs) / 60
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.png in {(time.perf_counter() - started) / 60:.1f} "
          f"minutes ({cpu_minutes:.1f} CPU minutes in the workers: {cpu_minutes / args.jobs:.1f} minutes on "
          f"{args.jobs} idle cores)")


def write_report(args, methods, reports, seconds, started):
    """bench/policy.json and .png from the runs finished so far; returns the results per taste."""
    done = [taste for taste in reports if reports[taste]]
    results = {taste: {"untuned": taste in UNTUNED, "seconds": seconds[taste],
                       "cpu_seconds": sum(r["cpu_seconds"] for r in reports[taste]),
                       "seeds": len(reports[taste]),
                       "reward_model_test_spearman": [r["reward_model"]["test_spearman"] for r in reports[taste]],
                       "methods": summarise(reports[taste], methods)} for taste in done}
    report = {"settings": SETTINGS, "methods": {m: METHODS[m] for m in methods}, "seeds": args.seeds,
              "epochs": args.epochs, "save_every": args.save_every, "ratings": args.ratings,
              "eval_images": args.eval_images, "steps": args.steps, "prompt_file": args.prompt_file,
              "eval_prompt_file": args.eval_prompt_file, "results": results, "opposite_pairs": opposite_pairs(results),
              "total_seconds": time.perf_counter() - started,
              "cpu_seconds": sum(r["cpu_seconds"] for rs in reports.values() for r in rs)}
    write_json_atomic(args.out, report)
    plot(os.path.splitext(args.out)[0] + ".png", results)
    return results


def print_table(results, methods):
    print(f"\n{'taste':>14} {'method':>17}  true gain at the last epoch (per seed) | proxy gain | gap | KL")
    for taste, result in results.items():
        for method in methods:
            row = result["methods"][method]
            by_seed = " ".join(f"{g[-1]:+.2f}" for g in row["true_gain_by_seed"])
            print(f"{taste:>14} {method:>17}  {row['true_gain'][-1]:+.2f} ± {row['true_gain_std'][-1]:.2f} ({by_seed})"
                  f" | {row['proxy_gain'][-1]:+.2f} | {row['gap'][-1]:+.2f} | {row['kl'][-1]:.1e}")


if __name__ == "__main__":
    sys.exit(main())
