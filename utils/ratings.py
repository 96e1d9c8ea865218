"""The person's ratings on disk and over HTTP: the formats of scores.json and comparisons.json, their one
reader, the one check of the rating page's POST bodies, and rating_order.json.

scores.json is the upstream WebApp's {"<seed>.png": -5..+5}; comparisons.json is
[{"a": "<seed>.png", "b": "<seed>.png", "winner": "a"|"b"|"tie"}]. Both name images of their own
round's folder only. rating_order.json holds, for the round's images that have a saved latent, the
reward ensemble's prediction:

    {"reward_model": "models/reward_model.safetensors", "ensemble_size": 4,
     "images": [{"file": "<seed>.png", "mean": 0.8, "std": 0.3, "members": [0.5, 1.1, 0.6, 1.0]}, ...]}

`images` is most informative first (ddpo/rating_order.py). train_reward.py writes it after training;
score.py writes it at start when a reward model is newer than it. The rating page orders by it on
request, and picks comparison pairs with it.
"""

import os

import torch
from safetensors import SafetensorError

from ddpo.rating_order import image_predictions, informativeness_summary
from ddpo.reward_model import member_scores
from utils.errors import UserError
from utils.families import FAMILY_NAMES
from utils.files import parse_json, read_json, write_json_atomic
from utils.reward_files import load_reward_model, reward_model_family
from utils.samples import latent_family, latent_file, load_latent, round_images

MIN_SCORE, MAX_SCORE = -5, 5
WINNERS = ("a", "b", "tie")  # a comparison's answer: a is better, b is better, about the same


# ---------------------------------------------------------------- the formats

def is_score(value):
    """Whether `value` is a score: a whole number from -5 to +5 (not a bool, not 2.0)."""
    return isinstance(value, int) and not isinstance(value, bool) and MIN_SCORE <= value <= MAX_SCORE


def scores_format_problem(scores):
    """Why `scores` is not in the original WebApp's format {"<file>.png": whole number in -5..+5}, or None."""
    if not isinstance(scores, dict):
        return f"not an object {{\"<seed>.png\": score}} but a {type(scores).__name__}"
    for name, score in scores.items():
        if not is_score(score):
            return f"not in the expected format (the score of {name!r} is {score!r}, not a whole number from -5 to 5)"
    return None


def round_file_problem(name):
    """Why a rating's file name cannot name a file of its round (a path, not a plain file name), or None."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        return f"{name!r} is not a plain file name of the round's folder"
    return None


def comparisons_format_problem(comparisons):
    """Why `comparisons` is not [{"a": "<file>.png", "b": "<file>.png", "winner": "a"|"b"|"tie"}, ...], or None."""
    if not isinstance(comparisons, list):
        return (f'not a list [{{"a": "<seed>.png", "b": "<seed>.png", "winner": "a"}}, ...] '
                f'but a {type(comparisons).__name__}')
    for number, entry in enumerate(comparisons, 1):
        if not (isinstance(entry, dict) and set(entry) == {"a", "b", "winner"} and not round_file_problem(entry["a"])
                and not round_file_problem(entry["b"]) and entry["a"] != entry["b"] and entry["winner"] in WINNERS):
            return (f'not in the expected format (entry {number}, {entry!r}, is not {{"a": "<file>", "b": "<another '
                    f'file>", "winner": "a", "b" or "tie"}})')
    return None


# ---------------------------------------------------------------- the one reader

class RatingsFileError(UserError):
    """A scores.json or comparisons.json that is not JSON or not in its format. The rating page sets such a
    file aside and starts afresh (`problem` says why); train_reward stops with the message."""

    def __init__(self, path, problem):
        super().__init__(f"{path} is {problem}; fix it, or move it away and rate again with `python score.py`.")
        self.path, self.problem = path, problem


def read_rating_file(path, format_problem, empty):
    """The checked JSON of a scores.json or comparisons.json, `empty` if there is none.

    RatingsFileError if it is not JSON or not in its format; UserError if it cannot be read at all
    (no permission, a folder or a FIFO in its place: only a regular file is opened, so nothing hangs).
    """
    if not os.path.lexists(path):
        return empty
    try:
        data = read_json(path)
    except ValueError as error:  # not JSON, not UTF-8, or nested too deeply
        raise RatingsFileError(path, f"not valid JSON ({error})") from None
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror}); fix or move it, then start again.") from None
    problem = format_problem(data)
    if problem:
        raise RatingsFileError(path, problem)
    return data


def read_scores(path):
    """{"<seed>.png": score} as saved in a scores.json ({} if there is none); see read_rating_file.

    Entries that name no plain file of the round (`../x.png`, `/abs/x.png`) are said once, and stay in
    the file (the page rewrites them as they were); round_scores leaves them out.
    """
    scores = read_rating_file(path, scores_format_problem, {})
    outside = [name for name in scores if round_file_problem(name)]
    if outside:
        print(f"warning: skipped {len(outside)} entries that name no file of its round in {path} (such as "
              f"{outside[0]!r}): a rating names an image of its own folder only; they stay in the file, unused.")
    return scores


def round_scores(scores):
    """The entries of `scores` that can name a file of their round: the only ones a stage uses."""
    return {name: score for name, score in scores.items() if not round_file_problem(name)}


def read_comparisons(path):
    """[{"a", "b", "winner"}] as saved in a comparisons.json ([] if there is none); see read_rating_file."""
    return read_rating_file(path, comparisons_format_problem, [])


def read_round_ratings(score_path, comparison_path):
    """(scores, comparisons) of one round: its scores.json's usable entries and its comparisons.json."""
    return round_scores(read_scores(score_path)), read_comparisons(comparison_path)


# ---------------------------------------------------------------- the one check of a POST body

# route: (its fields, the body to send); both are JSON objects with exactly these fields
REQUESTS = {
    "/api/score": ({"file", "score"}, '{"file": "<seed>.png", "score": <-5..5, or null to remove it>}'),
    "/api/compare": ({"a", "b", "winner"}, '{"a": "<seed>.png", "b": "<seed>.png", "winner": "a", "b" or "tie"}'),
}


def read_request(route, body, round_names, prompts=None):
    """The checked fields {name: value} of a POST body (bytes) to `route` (a key of REQUESTS).

    ValueError with a sentence for the 400 answer when the body is not UTF-8 JSON (however nested),
    not an object of exactly the route's fields, names no image of the round, holds a value out of range,
    or compares images of two prompts (`prompts`: {name: prompt}), which would teach the prompt-blind
    reward model which subject is preferred.
    """
    fields, example = REQUESTS[route]
    try:
        request = parse_json(body.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is one; parse_json makes a too deep nesting one
        raise ValueError("the request body is not JSON in UTF-8, or is nested too deeply") from None
    if not isinstance(request, dict) or set(request) != fields:
        raise ValueError(f"send {example}")
    names = [request[field] for field in ("file", "a", "b") if field in request]
    for name in names:
        if not isinstance(name, str) or name not in round_names:
            raise ValueError(f"{name!r} is not an image of this round")
    if "score" in request and not (request["score"] is None or is_score(request["score"])):
        raise ValueError(f"score {request['score']!r} is not a whole number from -5 to 5")
    if "winner" in request:
        if request["a"] == request["b"]:
            raise ValueError(f"an image cannot be compared with itself ({request['a']!r} twice)")
        if request["winner"] not in WINNERS:
            raise ValueError(f'winner {request["winner"]!r} is not "a", "b" or "tie"')
        if prompts is not None and prompts.get(request["a"]) != prompts.get(request["b"]):
            raise ValueError(f"{request['a']!r} and {request['b']!r} were made from different prompts; "
                             "compare only images of the same prompt")
    return request


# ---------------------------------------------------------------- rating_order.json

ORDER_FILE = "rating_order.json"


def order_path(sample_path):
    return os.path.join(sample_path, ORDER_FILE)


def write_rating_order(sample_path, names, member_scores, reward_model_path):
    """Write rating_order.json for `names` given the ensemble's (members, n) scores of them; returns its path."""
    path = order_path(sample_path)
    write_json_atomic(path, {"reward_model": reward_model_path, "ensemble_size": int(member_scores.shape[0]),
                             "images": image_predictions(names, member_scores)})
    return path


@torch.no_grad()
def order_round(sample_path, model, reward_model_path, device="cpu", batch_size=256):
    """Score the round's images that have a saved latent with every member; write rating_order.json.

    Returns a line for the terminal: what was written, or why the round was not ordered (None when the
    round has no saved latents).
    """
    names = [n for n in round_images(sample_path) if os.path.isfile(latent_file(sample_path, n))]
    if not names:
        return None
    other_family = family_mismatch(sample_path, names, reward_model_path)
    if other_family:
        return other_family
    model.eval()
    scores = torch.cat([member_scores(model, torch.stack([load_latent(latent_file(sample_path, n))
                                                          for n in names[i:i + batch_size]]).to(device)).cpu()
                        for i in range(0, len(names), batch_size)], dim=1)  # (members, n)
    path = write_rating_order(sample_path, names, scores, reward_model_path)
    return f"wrote {path}: {informativeness_summary(read_rating_order(sample_path))}"


def family_mismatch(sample_path, names, reward_model_path):
    """Why the reward model cannot order these latents (another model family: both have 4 channels, so its
    scores would look fine and mean nothing), or None."""
    trained = reward_model_family(reward_model_path)
    for name in names:
        try:
            family = latent_family(latent_file(sample_path, name))
        except (SafetensorError, OSError):  # a broken latent: load_latent names it when it is scored
            continue
        if family != trained:
            return (f"not ordering {sample_path}: its latents are {FAMILY_NAMES.get(family, family)} (such as "
                    f"{name}) and the reward model {reward_model_path} learned "
                    f"{FAMILY_NAMES.get(trained, trained)} latents; rate this round and run train_reward.py.")
    return None


def update_rating_order(sample_path, reward_model_path):
    """order_round with the saved reward model, unless rating_order.json is newer and covers the round.

    A new round has no order yet, and the model that can order it was trained on the rounds before.
    """
    if not os.path.isfile(reward_model_path):
        return None
    path, predictions = order_path(sample_path), read_rating_order(sample_path)
    with_latents = {n for n in round_images(sample_path) if os.path.isfile(latent_file(sample_path, n))}
    if (predictions is not None and os.path.getmtime(path) >= os.path.getmtime(reward_model_path)
            and {entry["file"] for entry in predictions} == with_latents):
        return None
    return order_round(sample_path, load_reward_model(reward_model_path), reward_model_path)


def read_rating_order(sample_path):
    """The entries of rating_order.json, or None when there is none (or it is not one train_reward wrote)."""
    try:
        images = read_json(order_path(sample_path))["images"]  # a regular file only, however nested
        return [{"file": str(e["file"]), "mean": float(e["mean"]), "std": float(e["std"]),
                 "members": [float(m) for m in e["members"]]} for e in images]
    except (OSError, ValueError, KeyError, TypeError):
        return None
