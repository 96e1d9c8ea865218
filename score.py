"""Stage 2: rate the current round of samples in a local web page.

    python score.py                                        # http://127.0.0.1:7870, opens your browser
    python score.py --score_port=8000 --score_open_browser=False

The page shows a grid of the round; click an image (or press Enter) for the full-screen view, where
the arrow keys move and change the score and the number keys rate and move on (the page lists them).
Every change is saved at once, so closing the tab or stopping this script (Ctrl-C) loses nothing.

The page can also show two images side by side to compare (← or → picks the better, ↓ says "about the
same"), and order the grid "most informative first" by the reward ensemble's disagreement.

Reads   samples/<seed>.png and its `parameters` text chunk (prompt, seed, LoRA), as generate.py writes them
        samples/scores.json if it exists: {"<seed>.png": score in -5..+5}, the seed WebApp's format
        samples/comparisons.json if it exists: [{"a": "<seed>.png", "b": "<seed>.png", "winner": "a"|"b"|"tie"}]
        models/reward_model.safetensors if it exists, with samples/latents/, to order the round (see below)
Writes  samples/scores.json at every change, atomically; scores of files not in the round are kept.
        samples/comparisons.json at every comparison, atomically (appended; earlier ones are kept).
        A file of the two that is not in its format is renamed to <name>.invalid-<time>, never deleted.
        samples/rating_order.json (utils/rating_order.py) when a reward model is newer than it.
Serves  the page in utils/score_page/ and the round's PNGs, nothing else (not latents/, not history/).
"""

import datetime
import errno
import ipaddress
import json
import os
import random
import sys
import threading
import webbrowser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from utils.cli import UserError, run_stage
from utils.files import MAX_SCORE, MIN_SCORE, WINNERS, comparisons_format_problem, scores_format_problem, write_json_atomic
from utils.rating_order import next_pairs, read_rating_order, update_rating_order
from utils.samples import parse_webui_parameters, read_png_parameters, round_images

USED_SETTINGS = ["sample_path", "score_path", "comparison_path", "reward_model_path", "score_host", "score_port",
                 "score_open_browser"]

MAX_REQUEST_BYTES = 4096  # a score request is about 40 bytes
PAGE_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "utils", "score_page")
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/score.css": ("score.css", "text/css; charset=utf-8"),
              "/score.js": ("score.js", "text/javascript; charset=utf-8")}


# ---------------------------------------------------------------- the round and its scores

def load_scores(score_path, format_problem=scores_format_problem, empty=dict, what="scores"):
    """The saved scores (or comparisons), and a notice for the page if the file had to be set aside."""
    if not os.path.exists(score_path):
        return empty(), None
    try:
        with open(score_path, encoding="utf-8") as f:
            scores = json.load(f)
        problem = format_problem(scores)
    except ValueError as error:  # not JSON, or not UTF-8
        problem = f"not valid JSON ({error})"
    if problem is None:
        return scores, None
    aside = f"{score_path}.invalid-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
    os.replace(score_path, aside)
    notice = f"{score_path} was {problem}. It is kept as {aside}; this session starts with no {what}."
    print(f"warning: {notice}")
    return empty(), notice


def describe_image(folder, name, score):
    """What the page shows of one image: its score and the prompt, seed and LoRA it was made with."""
    try:
        text = read_png_parameters(os.path.join(folder, name))
    except OSError:  # not a readable PNG; the browser will show it as broken, the page still works
        text = None
    parameters = parse_webui_parameters(text or "")
    width, _, height = parameters["settings"].get("Size", "").partition("x")
    return {"file": name, "score": score, "prompt": parameters["prompt"],
            "seed": parameters["settings"].get("Seed", os.path.splitext(name)[0]),
            "lora": ", ".join(f"{lora}:{weight}" for lora, weight in parameters["loras"]),
            "width": int(width) if width.isdigit() else None, "height": int(height) if height.isdigit() else None}


class RatingRound:
    """The images of the current round and their scores; every change is written to disk before it counts."""

    def __init__(self, sample_path, score_path, comparison_path=None):
        self.sample_path, self.score_path = sample_path, score_path
        self.comparison_path = comparison_path or os.path.join(os.path.dirname(score_path), "comparisons.json")
        self.lock = threading.Lock()  # one save at a time, so two quick changes never mix in the file
        self.scores, self.notice = load_scores(score_path)
        self.comparisons, comparison_notice = load_scores(self.comparison_path, comparisons_format_problem, list,
                                                          "comparisons")
        self.notice = " ".join(n for n in (self.notice, comparison_notice) if n) or None
        self.random = random.Random()

    def state(self):
        names = round_images(self.sample_path)
        return {"images": [describe_image(self.sample_path, name, self.scores.get(name)) for name in names],
                "sample_path": self.sample_path, "score_path": self.score_path, "notice": self.notice,
                **self.order_state(names), "comparison_path": self.comparison_path,
                "comparisons": len(self.comparisons)}

    def order_state(self, names):
        """"order": the round's images most informative first (rating_order.json), or None with a reason."""
        predictions = read_rating_order(self.sample_path)
        if not predictions:
            return {"order": None, "order_note": "no reward model has ordered this round yet "
                                                 "(run train_reward.py, then start score.py again)"}
        if max(entry["std"] for entry in predictions) == 0:
            return {"order": None, "order_note": "the reward model is a single CNN "
                                                 "(train it with --train_reward_ensemble_size=4)"}
        in_round = set(names)
        return {"order": [entry["file"] for entry in predictions if entry["file"] in in_round], "order_note": None}

    def add_comparison(self, a, b, winner):
        """Append one comparison to comparisons.json (replaced whole, atomically)."""
        with self.lock:
            comparisons = self.comparisons + [{"a": a, "b": b, "winner": winner}]
            write_json_atomic(self.comparison_path, comparisons)
            self.comparisons = comparisons

    def next_pair(self):
        """{"a", "b"}: the pair to compare next (most informative, see utils/rating_order.py), or Nones if none is left."""
        names = round_images(self.sample_path)
        pairs = next_pairs(names, read_rating_order(self.sample_path), self.comparisons, set(self.scores), self.random)
        a, b = pairs[0] if pairs else (None, None)
        return {"a": a, "b": b, "comparisons": len(self.comparisons)}

    def set_score(self, name, score):
        """Save `score` for image `name` (None removes its score); the file is replaced whole, atomically."""
        with self.lock:
            scores = {key: value for key, value in self.scores.items() if key != name}
            if score is not None:
                scores[name] = score
            write_json_atomic(self.score_path, scores)
            self.scores = scores  # only now: if the write failed, memory still matches the disk


def parse_score_request(body, round_names):
    """(file, score) from a POST body {"file": "<seed>.png", "score": -5..5 or null}; ValueError says what is wrong."""
    try:
        request = json.loads(body)
    except ValueError:
        raise ValueError("the request body is not JSON") from None
    if not isinstance(request, dict) or set(request) != {"file", "score"}:
        raise ValueError('send {"file": "<seed>.png", "score": <-5..5, or null to remove it>}')
    file, score = request["file"], request["score"]
    if file not in round_names:
        raise ValueError(f"{file!r} is not an image of this round")
    is_whole = isinstance(score, int) and not isinstance(score, bool)
    if score is not None and not (is_whole and MIN_SCORE <= score <= MAX_SCORE):
        raise ValueError(f"score {score!r} is not a whole number from -5 to 5")
    return file, score


def parse_comparison_request(body, round_names):
    """(a, b, winner) from a POST body {"a": "<seed>.png", "b": "<seed>.png", "winner": "a"|"b"|"tie"}; ValueError says what is wrong."""
    try:
        request = json.loads(body)
    except ValueError:
        raise ValueError("the request body is not JSON") from None
    if not isinstance(request, dict) or set(request) != {"a", "b", "winner"}:
        raise ValueError('send {"a": "<seed>.png", "b": "<seed>.png", "winner": "a", "b" or "tie"}')
    a, b, winner = request["a"], request["b"], request["winner"]
    for name in (a, b):
        if not isinstance(name, str) or name not in round_names:
            raise ValueError(f"{name!r} is not an image of this round")
    if a == b:
        raise ValueError(f"an image cannot be compared with itself ({a!r} twice)")
    if winner not in WINNERS:
        raise ValueError(f'winner {winner!r} is not "a", "b" or "tie"')
    return a, b, winner


# ---------------------------------------------------------------- the HTTP server

class RatingPageHandler(BaseHTTPRequestHandler):
    """GET the page, /api/state, /api/next_pair, /scores.json and /images/<seed>.png; POST /api/score and
    /api/compare. Anything else is a 404."""

    def do_GET(self):
        path = unquote(urlsplit(self.path).path)
        rating_round = self.server.rating_round
        if path in PAGE_FILES:
            file, content_type = PAGE_FILES[path]
            self.send_file(os.path.join(PAGE_FOLDER, file), content_type)
        elif path == "/api/state":
            self.send_json(200, rating_round.state())
        elif path == "/api/next_pair":
            self.send_json(200, rating_round.next_pair())
        elif path == "/scores.json":  # set_score swaps in a new dict, so this one is never half-changed
            self.send_json(200, rating_round.scores, {"Content-Disposition": 'attachment; filename="scores.json"'})
        elif path.startswith("/images/") and path.removeprefix("/images/") in round_images(rating_round.sample_path):
            # only names listed in the folder pass: "..", "/" or an encoded path can never match one
            self.send_file(os.path.join(rating_round.sample_path, path.removeprefix("/images/")), "image/png")
        else:
            self.send_json(404, {"error": f"not found: {path}"})

    def do_POST(self):
        if urlsplit(self.path).path not in ("/api/score", "/api/compare"):
            return self.send_json(404, {"error": "not found"})
        # a JSON content type makes the browser refuse other web sites' cross-origin posts
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self.send_json(400, {"error": "send the score as JSON (Content-Type: application/json)"})
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or not 0 < int(length) <= MAX_REQUEST_BYTES:
            return self.send_json(400, {"error": f"the request body must be 1 to {MAX_REQUEST_BYTES} bytes"})
        rating_round = self.server.rating_round
        body = self.rfile.read(int(length))
        if urlsplit(self.path).path == "/api/compare":
            return self.save_comparison(body)
        try:
            file, score = parse_score_request(body, round_images(rating_round.sample_path))
        except ValueError as error:
            return self.send_json(400, {"error": str(error)})
        try:
            rating_round.set_score(file, score)
        except OSError as error:  # a full disk, a read-only folder: the page must say it was not saved
            return self.send_json(500, {"error": f"cannot write {rating_round.score_path} ({error})"})
        self.send_json(200, {"file": file, "score": score})

    def save_comparison(self, body):
        """POST /api/compare: validate, append to comparisons.json, answer with the next pair."""
        rating_round = self.server.rating_round
        try:
            a, b, winner = parse_comparison_request(body, round_images(rating_round.sample_path))
        except ValueError as error:
            return self.send_json(400, {"error": str(error)})
        try:
            rating_round.add_comparison(a, b, winner)
        except OSError as error:
            return self.send_json(500, {"error": f"cannot write {rating_round.comparison_path} ({error})"})
        self.send_json(200, {"saved": {"a": a, "b": b, "winner": winner}, "next": rating_round.next_pair()})

    def send_json(self, status, obj, headers=None):
        self.send_body(status, json.dumps(obj).encode(), "application/json", headers)

    def send_file(self, path, content_type):
        with open(path, "rb") as f:
            self.send_body(200, f.read(), content_type)

    def send_body(self, status, body, content_type, headers=None):
        self.send_response(status)
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), "Cache-Control": "no-store",
                   "X-Content-Type-Options": "nosniff", **(headers or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        """Quiet: a page load fetches hundreds of images. Errors are still logged."""


class RatingServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # the browser dropped an image it scrolled past
            super().handle_error(request, client_address)


def make_server(settings):
    """The rating page's server, listening but not yet serving (call serve_forever; tests do it in a thread)."""
    if not 0 <= settings.score_port <= 65535:
        raise UserError(f"score_port must be from 0 to 65535 (got {settings.score_port}).")
    host, port = settings.score_host, settings.score_port
    try:
        server = RatingServer((host, port), RatingPageHandler)
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise UserError(f"cannot listen on {host}:{port} ({error}); check --score_host.") from None
        print(f"port {port} is taken; using a free one")
        server = RatingServer((host, 0), RatingPageHandler)
    # only once listening, so that a failed start renames no invalid scores.json
    server.rating_round = RatingRound(settings.sample_path, settings.score_path, settings.comparison_path)
    return server


def is_loopback(host):
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def main(settings):
    if not is_loopback(settings.score_host):
        print(f"warning: score_host={settings.score_host} is not loopback: anyone who can reach this machine "
              "can see your samples and change your scores.")
    server = make_server(settings)
    rating_round = server.rating_round
    names = round_images(settings.sample_path)
    if names:
        scored = sum(name in rating_round.scores for name in names)
        print(f"{len(names)} images in {settings.sample_path}, {scored} of them scored in {settings.score_path}")
    else:
        print(f"no images in {settings.sample_path}: run `python generate.py` first (the page says so too)")
    shown_host = "127.0.0.1" if settings.score_host == "0.0.0.0" else settings.score_host
    url = f"http://{shown_host}:{server.server_address[1]}/"
    print(f"rating page: {url}   (Ctrl-C to stop; every score is saved to {settings.score_path} at once)")
    try:
        order = update_rating_order(settings.sample_path, settings.reward_model_path)
    except Exception as error:  # the order is a convenience: a model or latent it cannot read must not stop rating
        order = f"warning: could not order the round with {settings.reward_model_path} ({error}); seed order only"
    if order:
        print(order)
    if settings.score_open_browser and not webbrowser.open(url):
        print("found no browser to open; open the address above yourself")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        with rating_round.lock:  # let a save in flight finish
            print(f"\nstopped; the scores are in {settings.score_path}")
    finally:
        server.server_close()


if __name__ == "__main__":
    run_stage(main, USED_SETTINGS)
