"""Stage 3: learn a person's taste: a small CNN that predicts their score from an image's latent.

    python train_reward.py [--name=value ...]

Reads   samples/scores.json ({"<seed>.png": -5..5}) and the rated rounds in samples/history/*/, each
        image's saved latent samples/latents/<seed>.safetensors (the PNG is VAE-encoded only when
        no latent was saved, e.g. for images made elsewhere).
Writes  models/reward_model.safetensors (the epoch with the best test loss; metadata in its header),
        models/reward_metrics.jsonl (loss, Pearson, Spearman, pairwise accuracy per epoch) and
        models/reward_metrics.png (their curves).

    python train_reward.py --rank_folder=path/to/images

ranks any folder of images with the trained model instead (best first), to check what it learned
against your own taste: prints the ranking and writes models/ranking.json and models/ranking.png
(a contact sheet in rank order); nothing is written into the ranked folder.
"""

import math
import os
import time

import torch
from PIL import Image
from tqdm.auto import tqdm

from utils.checkpoint import model_family
from utils.cli import UserError, run_stage
from utils.files import read_json, round_file_problem, scores_format_problem, write_json_atomic
from utils.metrics import append_jsonl, contact_sheet, pairwise_accuracy, pearson, plot_curves, read_jsonl, spearman
from utils.reward_model import (FAMILY_NAMES, MIN_LATENT_SIZE, LatentRewardModel, check_family, load_reward_model,
                                reward_model_metadata, save_reward_model)
from utils.samples import history_rounds, interrupted_archives, latent_family, latent_file, lives_in, load_latent
from utils.sampling import load_pipeline

USED_SETTINGS = ["sample_path", "score_path", "model_path", "reward_model_path", "checkpoint_path", "checkpoint_config", "device",
                 "train_reward_num_epochs", "train_reward_batch_size", "train_reward_test_split_ratio",
                 "train_reward_learning_rate", "train_reward_use_history", "train_reward_flip_augment",
                 "train_reward_min_correlation", "seed", "rank_folder"]
MIN_TEST_RATINGS = 10  # fewer held-out ratings than this make the test metrics noise
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SHEET_IMAGES = 48  # the contact sheet shows all images up to this many, else the best and worst halves


def read_scores(path):
    """{image name: score} from a scores.json; a malformed file is an error that names the entry.

    Entries that name no plain file of the round (`../x.png`, `/abs/x.png`, `sub/x.png`) are skipped with a warning.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: rate a round first with `python score.py`.")
    try:
        scores = read_json(path)
    except ValueError as error:  # not JSON, not UTF-8, or nested too deeply
        raise UserError(f"{path} is not valid JSON ({error}); fix it or rate again with `python score.py`.") from None
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror}); check its permissions.") from None
    problem = scores_format_problem(scores)
    if problem:
        raise UserError(f"{path} is {problem}; fix it or rate again with `python score.py`.")
    outside = [name for name in scores if round_file_problem(name)]
    if outside:
        print(f"warning: skipped {len(outside)} entries of {path} that name no file of its round "
              f"(such as {outside[0]!r}): a rating names an image of its own folder only")
    return {name: score for name, score in scores.items() if name not in outside}


def rated_rounds(settings):
    """(folder, scores.json path) of every round to learn from: the current one, then history/."""
    interrupted = interrupted_archives(settings.sample_path)
    if interrupted:
        raise UserError(f"{interrupted[0]} is a round whose move to history/ was interrupted: run "
                        "`python generate.py` or `python score.py` once to finish the move, then train again.")
    rounds = [(settings.sample_path, settings.score_path)]
    score_name = os.path.basename(settings.score_path)  # archiving moves it with the round, under its own name
    if settings.train_reward_use_history:
        rounds += [(folder, os.path.join(folder, score_name)) for folder in history_rounds(settings.sample_path)
                   if os.path.isfile(os.path.join(folder, score_name))]
    return rounds


def load_pairs(settings, device):
    """(latents (n, 4, h/8, w/8), scores (n,), model family) of every rated image found of the majority's
    size and family; missing images are counted."""
    latents, families, scores, missing, unencoded = [], [], [], 0, []
    rounds = rated_rounds(settings)
    if len(rounds) > 1 and not os.path.isfile(settings.score_path):
        rounds = rounds[1:]  # the current round is not rated yet; learn from the rated history
    for folder, score_file in rounds:
        for name, score in read_scores(score_file).items():
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
                continue
            scores.append(float(score))
    if missing:
        print(f"skipped {missing} rated entries whose image is not in their round's folder")
    if unencoded:
        family = encode_images(settings, unencoded, latents, device)
        families = [family if f is None else f for f in families]
    if not latents:
        raise UserError(f"no rated images found in {settings.score_path} (or history): rate some with `python score.py`.")
    kinds = [(tuple(x.shape), f) for x, f in zip(latents, families)]
    common = max(set(kinds), key=kinds.count)
    keep = [i for i, kind in enumerate(kinds) if kind == common]
    if len(keep) < len(latents):
        print(f"skipped {len(latents) - len(keep)} ratings of images of another size or model family than the "
              f"majority's {common[0]} {FAMILY_NAMES[common[1]]}")
    shape = common[0]
    if min(shape[1:]) < MIN_LATENT_SIZE:
        raise UserError(f"the rated images' latents are {shape[1]}x{shape[2]}, but the reward model needs at least "
                        f"{MIN_LATENT_SIZE}x{MIN_LATENT_SIZE} (images of {MIN_LATENT_SIZE * 8} px): "
                        "generate and rate larger images.")
    return torch.stack([latents[i] for i in keep]), torch.tensor([scores[i] for i in keep]), common[1]


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


def split(n, ratio):
    """Indices (train, test), shuffled with a fixed seed so every run holds out the same ratings."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_test = math.ceil(n * ratio) if ratio > 0 and n > 1 else 0
    return order[n_test:], order[:n_test]


@torch.no_grad()
def evaluate(model, latents, scores, batch_size):
    if len(scores) == 0:
        return {}
    model.eval()
    predicted = torch.cat([model(latents[i:i + batch_size]) for i in range(0, len(latents), batch_size)])
    model.train()
    return {"test_loss": torch.nn.functional.mse_loss(predicted, scores).item(),
            "test_pearson": pearson(predicted, scores), "test_spearman": spearman(predicted, scores),
            "test_pairwise_accuracy": pairwise_accuracy(predicted, scores)}


@torch.no_grad()
def rank_folder(settings, device):
    """--rank_folder: the trained model's score of every image in a folder, printed best first."""
    folder = settings.rank_folder
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)) if os.path.isdir(folder) else []
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
    print(f"full ranking in {json_path}; {'all images' if shown is ranking else f'the best and worst {SHEET_IMAGES // 2}'}"
          f" in rank order in {sheet_path}")


def short_name(name, length=18):
    return name if len(name) <= length else name[:length // 2 - 1] + "…" + name[-(length // 2):]


def main(settings):
    device = torch.device(settings.device)
    if settings.rank_folder:
        return rank_folder(settings, device)
    torch.manual_seed(settings.seed)
    latents, scores, family = load_pairs(settings, device)  # (n, 4, h/8, w/8), (n,), "sd15" or "sdxl"
    train_idx, test_idx = split(len(scores), settings.train_reward_test_split_ratio)
    if len(train_idx) == 0:
        raise UserError(f"train_reward_test_split_ratio={settings.train_reward_test_split_ratio} holds out all "
                        f"{len(scores)} ratings, leaving none to train on: lower it, or rate more images.")
    train_x, train_y = latents[train_idx].to(device), scores[train_idx].to(device)
    test_x, test_y = latents[test_idx].to(device), scores[test_idx].to(device)
    print(f"{len(scores)} ratings (mean {scores.mean():.2f}, variance {scores.var(unbiased=False):.2f}): "
          f"{len(train_idx)} to train on, {len(test_idx)} held out to test; {FAMILY_NAMES[family]} latents "
          f"{tuple(latents.shape[1:])}")
    if len(test_idx) < MIN_TEST_RATINGS:
        print(f"warning: only {len(test_idx)} ratings held out for testing; the test metrics below are unreliable. "
              "Rate more images (or raise train_reward_test_split_ratio).")

    model = LatentRewardModel().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.train_reward_learning_rate)
    os.makedirs(settings.model_path, exist_ok=True)
    metrics_path = os.path.join(settings.model_path, "reward_metrics.jsonl")
    run_started = time.strftime("%Y-%m-%d %H:%M:%S")
    best, best_state = None, None

    # ---------------------------------------------------------------- TRAINING
    for epoch in range(1, settings.train_reward_num_epochs + 1):
        order = torch.randperm(len(train_y), device=device)
        epoch_loss = 0.0
        for start in range(0, len(order), settings.train_reward_batch_size):
            batch = order[start:start + settings.train_reward_batch_size]
            x = train_x[batch]  # (b, 4, h/8, w/8)
            if settings.train_reward_flip_augment:
                flip = torch.rand(len(batch), device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = torch.nn.functional.mse_loss(model(x), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item() * len(batch)
        record = {"run": run_started, "epoch": epoch, "train_loss": epoch_loss / len(train_y),
                  **evaluate(model, test_x, test_y, settings.train_reward_batch_size)}
        append_jsonl(metrics_path, record)
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "run"))
        selection_loss = record.get("test_loss", record["train_loss"])
        if best is None or selection_loss <= best["selection_loss"]:
            best = {"selection_loss": selection_loss, **record}
            best_state = {k: v.clone() for k, v in model.state_dict().items()}

    # ---------------------------------------------------------------- SAVE the best epoch
    if not all(torch.isfinite(v).all() for v in best_state.values()):
        raise UserError(f"training diverged (the weights became NaN or infinite; train_reward_learning_rate="
                        f"{settings.train_reward_learning_rate} may be too high); {settings.reward_model_path} "
                        "was not written.")
    model.load_state_dict(best_state)
    save_reward_model(model, settings.reward_model_path, {
        "epoch": best["epoch"], "test_loss": best.get("test_loss"), "test_pearson": best.get("test_pearson"),
        "latent_shape": list(latents.shape[1:]), "family": family, "num_ratings": len(scores),
        "score_mean": scores.mean().item(), "score_std": scores.std().item() if len(scores) > 1 else 0.0})
    plot_path = os.path.join(settings.model_path, "reward_metrics.png")
    plot_curves(plot_path, [r for r in read_jsonl(metrics_path) if r.get("run") == run_started], "epoch",
                [("MSE loss", ["train_loss", "test_loss"]),
                 ("test set", ["test_pearson", "test_spearman", "test_pairwise_accuracy"])],
                f"reward model, {len(scores)} ratings; saved epoch {best['epoch']} (best test loss)")
    print(f"saved epoch {best['epoch']} (best test loss) to {settings.reward_model_path}; curves in {plot_path}")
    correlation = best.get("test_pearson")
    if correlation is not None and correlation < settings.train_reward_min_correlation:
        print(f"warning: the reward model's test correlation is only {correlation:.2f} "
              f"(< {settings.train_reward_min_correlation}): it has not learned your taste well enough to train a "
              "policy on. Rate more images, or rate more consistently, and train again.")


if __name__ == "__main__":
    run_stage(main, USED_SETTINGS)
