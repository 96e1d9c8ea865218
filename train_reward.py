"""Stage 3: learn a person's taste: a small CNN that predicts their score from an image's latent.

    python train_reward.py [--name=value ...]

Reads   samples/scores.json ({"<seed>.png": -5..5}), samples/comparisons.json ([{"a", "b", "winner"}],
        the rating page's pairwise mode) and the same files of the rated rounds in samples/history/*/,
        each image's saved latent samples/latents/<seed>.safetensors (the PNG is VAE-encoded only when
        no latent was saved, e.g. for images made elsewhere).
Writes  models/reward_model.safetensors (the epoch with the best test loss, or the best held-out order
        with the ranking loss; metadata in its header; an ensemble of CNNs with train_reward_ensemble_size > 1,
        each holding out different ratings), models/reward_metrics.jsonl (loss,
        Pearson, Spearman, pairwise and comparison accuracy per epoch), models/reward_metrics.png
        (their curves) and samples/rating_order.json (the ensemble's prediction and doubt for each image
        of the current round, which the rating page orders by; ddpo/rating_order.py).

While it runs, models/.lock keeps a second train_reward (or --rank_folder run) off the folder.

The training itself (losses, split, loop, best epoch) is ddpo/reward_training.py, which
tools/benchmark_ratings.py runs too.

    python train_reward.py --rank_folder=path/to/images

ranks any folder of images with the trained model instead (best first), to check what it learned
against your own taste: prints the ranking and writes models/ranking.json and models/ranking.png
(a contact sheet in rank order); nothing is written into the ranked folder.
"""

import os
import time

import torch
from PIL import Image
from tqdm.auto import tqdm

from ddpo.reward_model import MIN_LATENT_SIZE
from ddpo.reward_training import OUTCOMES, Ratings, fit_reward_model, split_ratings
from utils.checkpoint import model_family
from utils.cli import follows_recipe, run_stage
from utils.errors import UserError
from utils.families import FAMILY_NAMES
from utils.files import write_json_atomic
from utils.locks import folder_lock
from utils.metrics import append_jsonl, contact_sheet, plot_curves, read_jsonl
from utils.pipeline import load_pipeline
from utils.ratings import order_round, read_round_ratings
from utils.reward_files import check_family, load_reward_model, reward_model_metadata, save_reward_model
from utils.round_check import check_previous_reward_model
from utils.samples import (
    history_rounds,
    interrupted_archives,
    latent_family,
    latent_file,
    lives_in,
    load_latent,
    round_prompts,
)

USED_SETTINGS = ["sample_path", "score_path", "comparison_path", "model_path", "reward_model_path", "checkpoint_path",
                 "checkpoint_config", "device", "train_reward_recipe",
                 "train_reward_num_epochs", "train_reward_batch_size", "train_reward_test_split_ratio",
                 "train_reward_learning_rate", "train_reward_use_history", "train_reward_flip_augment",
                 "train_reward_min_correlation", "train_reward_loss", "train_reward_ensemble_size", "seed",
                 "rank_folder"]
MIN_TEST_RATINGS = 10  # fewer held-out ratings than this make the test metrics noise
FEW_RATINGS = 1000  # upstream's ratings per round; below it the few_ratings recipe learns far more from each
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SHEET_IMAGES = 48  # the contact sheet shows all images up to this many, else the best and worst halves


def rated_rounds(settings):
    """(folder, scores.json, comparisons.json) of every round to learn from: the current one, then history/."""
    interrupted = interrupted_archives(settings.sample_path)
    if interrupted:
        raise UserError(f"{interrupted[0]} is a round whose move to history/ was interrupted: run "
                        "`python generate.py` or `python score.py` once to finish the move, then train again.")
    rounds = [(settings.sample_path, settings.score_path, settings.comparison_path)]
    # archiving moves them with the round, under their own names
    names = [os.path.basename(settings.score_path), os.path.basename(settings.comparison_path)]
    if settings.train_reward_use_history:
        rounds += [(folder, *(os.path.join(folder, name) for name in names))
                   for folder in history_rounds(settings.sample_path)
                   if any(os.path.isfile(os.path.join(folder, name)) for name in names)]
    return rounds


def load_ratings(settings, device):
    """(model family, Ratings (ddpo/reward_training.py)) of every scored or compared image found of the
    majority's size and family; missing images are counted. Each score's group is its image's prompt
    (utils/samples.round_prompts, over all rounds), within which the ranking loss pairs scores."""
    latents, families, index, unencoded, missing = [], [], {}, [], 0
    scored, scores, pairs, outcomes, groups, group_of_prompt = [], [], [], [], [], {}

    def latent_index(folder, name):
        """Where the image's latent is in `latents` (None if the image is gone); each image is loaded once."""
        nonlocal missing
        key = (folder, name)
        if key not in index:
            saved = latent_file(folder, name)
            if lives_in(os.path.dirname(saved), os.path.basename(saved)):
                latents.append(load_latent(saved))
                families.append(latent_family(saved))
            elif lives_in(folder, name):
                unencoded.append((len(latents), os.path.join(folder, name)))
                latents.append(None)
                families.append(None)
            else:  # gone, or a link to a file outside the round
                missing += 1
                return None
            index[key] = len(latents) - 1
        return index[key]

    rounds = rated_rounds(settings)
    if not any(os.path.lexists(p) for p in (settings.score_path, settings.comparison_path)):
        if len(rounds) == 1:
            raise UserError(f"{settings.score_path} not found: rate a round first with `python score.py`.")
        rounds = rounds[1:]  # the current round is not rated yet; learn from the rated history
    for folder, score_file, comparison_file in rounds:
        round_scores, round_comparisons = read_round_ratings(score_file, comparison_file)
        prompts = round_prompts(folder)
        for name, score in round_scores.items():
            i = latent_index(folder, name)
            if i is not None:
                scored.append(i)
                scores.append(float(score))
                groups.append(group_of_prompt.setdefault(prompts.get(name), len(group_of_prompt)))
        for comparison in round_comparisons:
            a, b = latent_index(folder, comparison["a"]), latent_index(folder, comparison["b"])
            if a is not None and b is not None:
                pairs.append((a, b))
                outcomes.append(OUTCOMES[comparison["winner"]])
    if missing:
        print(f"skipped {missing} rated entries whose image is not in their round's folder")
    if unencoded:
        family = encode_images(settings, unencoded, latents, device)
        families = [family if f is None else f for f in families]
    if not latents:
        raise UserError(f"no rated images found in {settings.score_path} (or history): rate some with "
                        "`python score.py`.")
    kinds = [(tuple(x.shape), f) for x, f in zip(latents, families)]
    common = max(set(kinds), key=kinds.count)
    shape, family = common
    if min(shape[1:]) < MIN_LATENT_SIZE:
        raise UserError(f"the rated images' latents are {shape[1]}x{shape[2]}, but the reward model needs at least "
                        f"{MIN_LATENT_SIZE}x{MIN_LATENT_SIZE} (images of {MIN_LATENT_SIZE * 8} px): "
                        "generate and rate larger images.")
    new_index = {i: n for n, i in enumerate(i for i, kind in enumerate(kinds) if kind == common)}
    kept_scores = [(new_index[i], s, g) for i, s, g in zip(scored, scores, groups) if i in new_index]
    kept_pairs = [((new_index[a], new_index[b]), o) for (a, b), o in zip(pairs, outcomes)
                  if a in new_index and b in new_index]
    if len(kept_scores) + len(kept_pairs) < len(scores) + len(pairs):
        print(f"skipped {len(scores) + len(pairs) - len(kept_scores) - len(kept_pairs)} ratings of images of another "
              f"size or model family than the majority's {shape} {FAMILY_NAMES[family]}")
    return family, Ratings(torch.stack([latents[i] for i in new_index]),
                   torch.tensor([i for i, _, _ in kept_scores], dtype=torch.long),
                   torch.tensor([s for _, s, _ in kept_scores], dtype=torch.float32),
                   torch.tensor([p for p, _ in kept_pairs], dtype=torch.long).reshape(-1, 2),
                   torch.tensor([o for _, o in kept_pairs], dtype=torch.float32),
                   torch.tensor([g for _, _, g in kept_scores], dtype=torch.long))


@torch.no_grad()
def encode_images(settings, unencoded, latents, device, size=None):
    """VAE-encode images that have no saved latent (made elsewhere) into `latents`, in place; returns the
    checkpoint's model family (theirs now). Images are resized to `size` (h, w) if given.
    """
    print(f"VAE-encoding {len(unencoded)} images that have no saved latent")
    pipeline = load_pipeline(settings.checkpoint_path, device, torch.float32, settings.checkpoint_config)
    height, width = size or (None, None)
    for index, path in tqdm(unencoded, desc="encoding", unit="img"):
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # PIL raises all of these
            raise UserError(f"{path} is not a readable image ({error}) and has no saved latent: move it away "
                            "or remove its rating.") from None
        pixels = pipeline.image_processor.preprocess(rgb, height, width).to(device)
        latent = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
        latents[index] = latent[0].cpu()  # (4, h/8, w/8)
    return model_family(pipeline)


@torch.no_grad()
def rank_folder(settings, device):
    """--rank_folder: the trained model's score of every image in a folder, printed best first."""
    folder = settings.rank_folder
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)) \
        if os.path.isdir(folder) else []
    if not names:
        raise UserError(f"--rank_folder={folder!r} is not a folder with .png, .jpg or .webp images in it.")
    model = load_reward_model(settings.reward_model_path, device)
    saved = [latent_file(folder, n) for n in names]
    latents = [load_latent(path) if os.path.isfile(path) else None for path in saved]
    for family in {latent_family(path) for path in saved if os.path.isfile(path)}:
        check_family(settings.reward_model_path, family, f"the saved latents in {folder}")
    unencoded = [(i, os.path.join(folder, n)) for i, n in enumerate(names) if latents[i] is None]
    if unencoded:  # at the size the model was trained on, as the person saw their samples
        shape = reward_model_metadata(settings.reward_model_path).get("latent_shape")
        family = encode_images(settings, unencoded, latents, device, shape and (shape[1] * 8, shape[2] * 8))
        check_family(settings.reward_model_path, family, f"the images of {folder} encoded by checkpoint_path's VAE")
    scores = sorted(((model(x[None].to(device)).item(), n) for x, n in zip(latents, names)), reverse=True)
    ranking = [{"rank": rank, "image": name, "score": score} for rank, (score, name) in enumerate(scores, 1)]

    print(f"{len(names)} images in {folder}, best first by the reward model {settings.reward_model_path}:")
    shown_in_terminal = ranking if len(ranking) <= 20 else ranking[:10] + [None] + ranking[-10:]
    for entry in shown_in_terminal:
        if entry is None:
            print(f"{'...':>6}")
        else:
            print(f"{entry['rank']:>6}  {entry['score']:+.3f}  {entry['image']}")
    os.makedirs(settings.model_path, exist_ok=True)
    json_path, sheet_path = (os.path.join(settings.model_path, name) for name in ("ranking.json", "ranking.png"))
    write_json_atomic(json_path, {"folder": os.path.abspath(folder), "reward_model": settings.reward_model_path,
                                  "ranking": ranking})
    shown = ranking if len(ranking) <= SHEET_IMAGES else ranking[:SHEET_IMAGES // 2] + ranking[-(SHEET_IMAGES // 2):]
    contact_sheet(sheet_path, [os.path.join(folder, e["image"]) for e in shown],
                  [f"#{e['rank']}  {e['score']:+.2f}\n{short_name(e['image'])}" for e in shown])
    shown_what = 'all images' if shown is ranking else f'the best and worst {SHEET_IMAGES // 2}'
    print(f"full ranking in {json_path}; {shown_what}"
          f" in rank order in {sheet_path}")


def short_name(name, length=18):
    return name if len(name) <= length else name[:length // 2 - 1] + "…" + name[-(length // 2):]


def main(settings):
    # one run per models folder: two would write the same reward model and metrics
    with folder_lock(settings.model_path, "train_reward"):
        train(settings)


def train(settings):
    device = torch.device(settings.device)
    if settings.rank_folder:
        return rank_folder(settings, device)
    torch.manual_seed(settings.seed)
    family, ratings = load_ratings(settings, device)
    check_previous_reward_model(settings, device)  # before the model is overwritten: did the last LoRA fool it?
    ratings = ratings.to(device)
    count, ratio = settings.train_reward_ensemble_size, settings.train_reward_test_split_ratio
    train, test = split_ratings(ratings, ratio)  # each CNN's counts; the ensemble's members hold out different ones
    if len(train) == 0:
        raise UserError(f"train_reward_test_split_ratio={ratio} holds out all "
                        f"{len(test)} ratings, leaving none to train on: lower it, or rate more images.")
    scores = ratings.scores
    spread = f" (mean {scores.mean():.2f}, variance {scores.var(unbiased=False):.2f})" if len(scores) else ""
    compared = f" and {len(ratings.pairs)} comparisons" if len(ratings.pairs) else ""
    ensemble = f", an ensemble of {count}" if count > 1 else ""
    different = (f" (each of the {count} CNNs holds out different ones, so every rating trains some of them)"
                 if count > 1 and len(test) else "")
    print(f"{len(scores)} ratings{spread}{compared}: {len(train)} to train on, {len(test)} held out to test"
          f"{different}; {FAMILY_NAMES[family]} latents {tuple(ratings.latents.shape[1:])}; loss "
          f"{settings.train_reward_loss}{' + Bradley-Terry' if compared else ''}{ensemble}")
    if len(scores) + len(ratings.pairs) < FEW_RATINGS and follows_recipe(settings, "upstream"):
        print("note: below ~1000 ratings, --train_reward_recipe=few_ratings learns far more: on 4 scripted tastes, 300 "
              "ratings gave held-out Spearman 0.88 against upstream's 0.65 (docs/rating-efficiency.md).")
    prompt_groups = len(torch.unique(ratings.groups))
    if settings.train_reward_loss == "ranking" and prompt_groups > 1:
        print(f"the scores are of {prompt_groups} prompts: the ranking loss orders images of the same prompt only")
    if ratio == 0:
        print("note: train_reward_test_split_ratio=0 holds nothing out, so there are no test metrics and no warning "
              "if the model learned little: check it with --rank_folder on images you know.")
    elif min(len(ratings), count * len(test)) < MIN_TEST_RATINGS:
        print(f"warning: only {len(test)} ratings held out for testing; the test metrics below are unreliable. "
              "Rate more images (or raise train_reward_test_split_ratio).")
    os.makedirs(settings.model_path, exist_ok=True)
    metrics_path = os.path.join(settings.model_path, "reward_metrics.jsonl")
    run_started = time.strftime("%Y-%m-%d %H:%M:%S")

    def log_epoch(record):
        append_jsonl(metrics_path, {"run": run_started, **record})
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

    # ---------------------------------------------------------------- TRAINING
    model, best = fit_reward_model(settings, ratings, on_epoch=log_epoch)

    # ---------------------------------------------------------------- SAVE the best epoch
    if not all(torch.isfinite(v).all() for v in model.state_dict().values()):
        raise UserError(f"training diverged (the weights became NaN or infinite; train_reward_learning_rate="
                        f"{settings.train_reward_learning_rate} may be too high); {settings.reward_model_path} "
                        "was not written.")
    save_reward_model(model, settings.reward_model_path, {
        "epoch": best["epoch"], "test_loss": best.get("test_loss"), "test_pearson": best.get("test_pearson"),
        "test_spearman": best.get("test_spearman"), "test_comparison_accuracy": best.get("test_comparison_accuracy"),
        "latent_shape": list(ratings.latents.shape[1:]), "family": family, "num_ratings": len(scores),
        "num_comparisons": len(ratings.pairs), "loss": settings.train_reward_loss,
        "ensemble_size": settings.train_reward_ensemble_size,
        "score_mean": scores.mean().item() if len(scores) else 0.0,
        "score_std": scores.std().item() if len(scores) > 1 else 0.0})
    plot_path = os.path.join(settings.model_path, "reward_metrics.png")
    plot_curves(plot_path, [r for r in read_jsonl(metrics_path) if r.get("run") == run_started], "epoch",
                [(f"loss ({settings.train_reward_loss}" + (" + Bradley-Terry)" if len(ratings.pairs) else ")"),
                  ["train_loss", "test_loss"]),
                 ("test set", ["test_pearson", "test_spearman", "test_pairwise_accuracy", "test_comparison_accuracy"])],
                f"reward model, {len(scores)} scores, {len(ratings.pairs)} comparisons; "
                f"saved epoch {best['epoch']} ({best['chosen_by']})")
    print(f"saved epoch {best['epoch']} ({best['chosen_by']}) to {settings.reward_model_path}; curves in {plot_path}")
    order = order_round(settings.sample_path, model, settings.reward_model_path, device)
    if order:
        print(order)
    correlation = best.get("test_pearson")
    if correlation is not None and correlation < settings.train_reward_min_correlation:
        print(f"warning: the reward model's test correlation is only {correlation:.2f} "
              f"(< {settings.train_reward_min_correlation}): it has not learned your taste well enough to train a "
              "policy on. Rate more images, or rate more consistently, and train again.")


if __name__ == "__main__":
    run_stage(main, USED_SETTINGS)
