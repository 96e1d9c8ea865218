"""Stage 2: rate the current round of samples in a local web page.

    python score.py                                        # http://127.0.0.1:7870, opens your browser
    python score.py --score_port=8000 --score_open_browser=False

The page shows a grid of the round; click an image (or press Enter) for the full-screen view, where
the arrow keys move and change the score and the number keys rate and move on (the page lists them).
Every change is saved at once, so closing the tab or stopping this script (Ctrl-C) loses nothing.

The page can also show two images of the same prompt side by side to compare (← or → picks the better,
↓ says "about the same"), order the grid "most informative first" by the reward ensemble's
disagreement, and, for a round made from a prompt_file, show only the images of one prompt.
docs/rating-page.md has the details and the page's safety rules.

Reads   samples/<seed>.png and its `parameters` text chunk (prompt, seed, LoRA), as generate.py writes them
        samples/round.json's "prompts" if it has them: each image's prompt (else the PNG's)
        samples/scores.json if it exists: {"<seed>.png": score in -5..+5}, the original WebApp's format
        samples/comparisons.json if it exists: [{"a": "<seed>.png", "b": "<seed>.png", "winner": "a"|"b"|"tie"}]
        models/reward_model.safetensors if it exists, with samples/latents/, to order the round (see below)
Writes  samples/scores.json at every change, atomically; scores of files not in the round are kept.
        samples/comparisons.json at every comparison, atomically (appended; earlier ones are kept).
        A file of the two that is not in its format is renamed to <name>.invalid-<time>, never deleted.
        samples/rating_order.json (ddpo/rating_order.py) when a reward model (of this round's model family)
        is newer than it.
Serves  the page in utils/score_page/ and the round's PNGs, nothing else (not latents/, not history/).
Only to the person at this machine: requests naming another host (DNS rebinding), writes from another
web page (their Origin), and framing by another site are refused; see check_request. While it runs,
samples/.lock keeps generate.py (and a second page) off the folder.
"""

import datetime
import errno
import ipaddress
import json
import os
import random
import re
import socket
import sys
import threading
import webbrowser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from ddpo.rating_order import next_pairs
from utils.cli import run_stage
from utils.errors import UserError
from utils.files import read_regular_file, write_json_atomic
from utils.locks import FolderLock
from utils.ratings import (
    RatingsFileError,
    read_comparisons,
    read_rating_order,
    read_request,
    read_scores,
    update_rating_order,
)
from utils.samples import (
    finish_interrupted_archive,
    is_round_image,
    parse_webui_parameters,
    read_png_parameters,
    round_images,
    round_prompts,
)

USED_SETTINGS = ["sample_path", "score_path", "comparison_path", "reward_model_path", "score_host", "score_port",
                 "score_open_browser"]

MAX_REQUEST_BYTES = 4096  # a score request is about 40 bytes
PAGE_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "utils", "score_page")
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/score.css": ("score.css", "text/css; charset=utf-8"),
              "/score.js": ("score.js", "text/javascript; charset=utf-8")}
HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.\-]+)(?::(\d{1,5}))?")  # name or [IPv6], then :port
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "[::1]"}
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
# Sent with every answer: no other site may frame the page (clickjacking), embed its images or make the
# browser guess a type; the page itself needs nothing from anywhere else.
SECURITY_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
                    "X-Content-Type-Options": "nosniff", "Cross-Origin-Resource-Policy": "same-origin",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
# route: (RatingRound's method that saves it, the attribute naming the file it writes)
POSTS = {"/api/score": ("set_score", "score_path"), "/api/compare": ("add_comparison", "comparison_path")}


# ---------------------------------------------------------------- the round and its scores

def load_ratings_file(path, read, empty, what):
    """The saved scores or comparisons (read: utils/ratings.py's reader), and a notice for the page if the file
    had to be set aside (not JSON, not in its format): the person can go on rating, and nothing is lost."""
    try:
        return read(path), None
    except RatingsFileError as error:
        aside = f"{path}.invalid-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
        os.replace(path, aside)
        notice = f"{path} was {error.problem}. It is kept as {aside}; this session starts with no {what}."
        print(f"warning: {notice}")
        return empty, notice


def describe_image(folder, name, score, prompt=None):
    """What the page shows of one image: its score and the prompt, seed and LoRA it was made with.

    prompt: the image's prompt from round.json (a round made from a prompt_file); else the PNG's.
    """
    parameters = image_parameters(folder, name)
    width, _, height = parameters["settings"].get("Size", "").partition("x")
    return {"file": name, "score": score, "prompt": parameters["prompt"] if prompt is None else prompt,
            "seed": parameters["settings"].get("Seed", os.path.splitext(name)[0]),
            "lora": ", ".join(f"{lora}:{weight}" for lora, weight in parameters["loras"]),
            "width": _size(width), "height": _size(height)}


def image_parameters(folder, name):
    """The PNG's WebUI parameters (utils/samples.py parse_webui_parameters), empty ones if it has none."""
    try:
        text = read_png_parameters(os.path.join(folder, name))
    except Exception:  # noqa: BLE001 - garbage, truncated: PIL raises many kinds. The browser shows it broken;
        text = None    # the page and every other image still work
    return parse_webui_parameters(text if isinstance(text, str) else "")


def _size(text):
    return int(text) if text.isascii() and text.isdigit() else None


class RatingRound:
    """The images of the current round and their ratings; every change is written to disk before it counts."""

    def __init__(self, sample_path, score_path, comparison_path):
        self.sample_path, self.score_path, self.comparison_path = sample_path, score_path, comparison_path
        self.lock = threading.Lock()  # one save at a time, so two quick changes never mix in the file
        # all of scores.json, entries naming no file of the round too: they are written back as they were
        self.scores, score_notice = load_ratings_file(score_path, read_scores, {}, "scores")
        self.comparisons, comparison_notice = load_ratings_file(comparison_path, read_comparisons, [], "comparisons")
        self.notice = " ".join(n for n in (score_notice, comparison_notice) if n) or None
        self.random = random.Random()

    def images(self):
        """describe_image of each image of the round, in seed order."""
        prompts = round_prompts(self.sample_path)
        return [describe_image(self.sample_path, name, self.scores.get(name), prompts.get(name))
                for name in round_images(self.sample_path)]

    def prompts(self):
        """{name: its prompt} for the round's images, as images() has them (a PNG is read only when round.json
        does not say)."""
        prompts = round_prompts(self.sample_path)
        return {name: prompts[name] if name in prompts else image_parameters(self.sample_path, name)["prompt"]
                for name in round_images(self.sample_path)}

    def state(self):
        images = self.images()
        return {"images": images, "sample_path": self.sample_path, "score_path": self.score_path,
                "notice": self.notice, **self.order_state([image["file"] for image in images]),
                "comparison_path": self.comparison_path, "comparisons": len(self.comparisons)}

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

    def next_pair(self):
        """{"a", "b"}: the pair to compare next, two images of one prompt (most informative, see
        ddpo/rating_order.py), or Nones if none is left."""
        prompts = self.prompts()
        pairs = next_pairs(list(prompts), read_rating_order(self.sample_path), self.comparisons, set(self.scores),
                           self.random, groups=prompts)
        a, b = pairs[0] if pairs else (None, None)
        return {"a": a, "b": b, "comparisons": len(self.comparisons)}

    def set_score(self, file, score):
        """POST /api/score: save `score` for image `file` (None removes its score); scores.json is replaced
        whole, atomically."""
        with self.lock:
            scores = {key: value for key, value in self.scores.items() if key != file}
            if score is not None:
                scores[file] = score
            write_json_atomic(self.score_path, scores)
            self.scores = scores  # only now: if the write failed, memory still matches the disk
        return {"file": file, "score": score}

    def add_comparison(self, a, b, winner):
        """POST /api/compare: append one comparison to comparisons.json (replaced whole, atomically); answers
        with the next pair."""
        with self.lock:
            comparisons = self.comparisons + [{"a": a, "b": b, "winner": winner}]
            write_json_atomic(self.comparison_path, comparisons)
            self.comparisons = comparisons
        return {"saved": {"a": a, "b": b, "winner": winner}, "next": self.next_pair()}


# ---------------------------------------------------------------- the HTTP server

def allowed_hosts(score_host):
    """Host names the page answers to: loopback, the configured host, and, listening on every address,
    this machine's names and any IP address (a rebinding attack needs a DNS name; an IP cannot be rebound)."""
    hosts = set(LOOPBACK_NAMES)
    if score_host in WILDCARD_HOSTS:
        hosts |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        hosts.add(f"[{score_host}]" if ":" in score_host else score_host.lower())
    return hosts


def is_ip_literal(host):
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def check_request(method, headers, port, hosts, any_ip):
    """Why a request must be refused, or None: the one guard in front of every route.

    Host must name this page (`hosts`, with `port`; any IP address if `any_ip`): a web page whose DNS
    name is made to point at 127.0.0.1 (DNS rebinding) sends its own name. A write (anything but GET
    and HEAD) from a browser must come from the page itself: its Origin, when sent, must be this
    page's address (a `null` Origin, from a sandboxed frame or a file, is refused too), and
    Sec-Fetch-Site, when sent, must be same-origin.
    """
    host = (headers.get("Host") or "").strip().lower()
    match = HOST_HEADER.fullmatch(host)
    name, host_port = (match.group(1), match.group(2) or "80") if match else (None, None)
    if not (match and (name in hosts or (any_ip and is_ip_literal(name))) and host_port == str(port)):
        return f"this page answers only to its own address, such as http://127.0.0.1:{port}/, not to Host {host!r}"
    if method in ("GET", "HEAD"):
        return None
    origin = headers.get("Origin")
    if origin is not None and origin.strip().lower() != f"http://{host}":
        return f"a change may only come from this page itself (http://{host}), not from origin {origin!r}"
    fetch_site = headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site.strip().lower() != "same-origin":
        return f"a change may only come from this page itself, not from a {fetch_site} request"
    return None


class RatingPageHandler(BaseHTTPRequestHandler):
    """GET the page, /api/state, /api/next_pair, /scores.json and /images/<seed>.png; POST /api/score and
    /api/compare. Anything else is a 404."""

    timeout = 60  # seconds a client may stall mid-request before its thread gives up on it

    def parse_request(self):
        """Every request passes check_request before any route sees it (whatever its method)."""
        if not super().parse_request():
            return False
        server = self.server
        problem = check_request(self.command, self.headers, server.server_address[1], server.hosts, server.any_ip)
        if problem:
            self.send_json(403, {"error": problem})
            return False
        return True

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
        elif path.startswith("/images/") and is_round_image(rating_round.sample_path, path.removeprefix("/images/")):
            # only <digits>.png, a real file of the folder, passes: "..", "/", an encoded path or a symlink out never
            self.send_file(os.path.join(rating_round.sample_path, path.removeprefix("/images/")), "image/png")
        else:
            self.send_json(404, {"error": f"not found: {path}"})

    def do_POST(self):
        """POST /api/score and /api/compare alike: one check of the body (utils/ratings.py read_request),
        then the round's method of that name saves it before the answer."""
        route = urlsplit(self.path).path
        if route not in POSTS:
            return self.send_json(404, {"error": "not found"})
        # a JSON content type makes the browser refuse other web sites' cross-origin posts
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self.send_json(400, {"error": "send the rating as JSON (Content-Type: application/json)"})
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or not 0 < int(length) <= MAX_REQUEST_BYTES:
            return self.send_json(400, {"error": f"the request body must be 1 to {MAX_REQUEST_BYTES} bytes"})
        rating_round = self.server.rating_round
        try:
            body = self.rfile.read(int(length))
            prompts = rating_round.prompts() if route == "/api/compare" else None
            request = read_request(route, body, round_images(rating_round.sample_path), prompts)
        except ValueError as error:
            return self.send_json(400, {"error": str(error)})
        save, written = POSTS[route]
        try:
            answer = getattr(rating_round, save)(**request)
        except OSError as error:  # a full disk, a read-only folder: the page must say it was not saved
            return self.send_json(500, {"error": f"cannot write {getattr(rating_round, written)} "
                                                 f"({error.strerror or error})"})
        self.send_json(200, answer)

    def send_json(self, status, obj, headers=None):
        self.send_body(status, json.dumps(obj).encode(), "application/json", headers)

    def send_file(self, path, content_type):
        try:
            body = read_regular_file(path)  # never a FIFO put in a PNG's place since it was listed
        except OSError:  # gone since it was listed (a new round started)
            return self.send_json(404, {"error": "not found"})
        self.send_body(200, body, content_type)

    def send_body(self, status, body, content_type, headers=None):
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self):
        """SECURITY_HEADERS on every answer: the routes' and the server's own (send_error: an unknown method,
        a malformed request line, a URL or header too long)."""
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def log_request(self, code="-", size="-"):
        """Quiet: a page load fetches hundreds of images. Errors are still logged."""


class RatingServer(ThreadingHTTPServer):
    folder_lock = None

    def handle_error(self, request, client_address):
        # the browser dropped an image it scrolled past, or a client stalled past the timeout
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def server_close(self):
        super().server_close()
        if self.folder_lock:
            self.folder_lock.release()


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
    server.hosts, server.any_ip = allowed_hosts(host), host in WILDCARD_HOSTS
    # only once listening, so that a failed start renames no invalid scores.json
    server.folder_lock = FolderLock(settings.sample_path, "score")
    try:
        server.folder_lock.acquire()
        finish_interrupted_archive(settings.sample_path, [os.path.basename(settings.score_path),
                                                          os.path.basename(settings.comparison_path)])
        server.rating_round = RatingRound(settings.sample_path, settings.score_path, settings.comparison_path)
    except BaseException:
        server.server_close()
        raise
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
