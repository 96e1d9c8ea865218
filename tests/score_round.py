"""For the rating page's tests: a round of small PNGs as generate.py writes them, and score.py serving it."""

import contextlib
import json
import os
import threading

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

import score
from utils.cli import parse_settings
from utils.samples import webui_parameters

WIDTH, HEIGHT = 96, 144  # the 2:3 shape of the default 720x1080, small
CHROMIUM = "/usr/bin/chromium"  # Debian's, driven by Playwright
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
COLOURS = [(214, 69, 65), (52, 152, 219), (241, 196, 15), (46, 204, 113), (155, 89, 182), (230, 126, 34)]


def write_round(folder, seeds, lora_name="ui_lora_epoch_10"):
    """<seed>.png for each seed, each a different colour, with WebUI parameters; returns the file names."""
    os.makedirs(folder, exist_ok=True)
    font = ImageFont.load_default(size=40)
    for index, seed in enumerate(seeds):
        colour = COLOURS[index % len(COLOURS)]
        image = Image.new("RGB", (WIDTH, HEIGHT), tuple(c // 3 for c in colour))
        draw = ImageDraw.Draw(image)
        draw.ellipse((8, 30, WIDTH - 8, 30 + WIDTH - 16), fill=colour)
        draw.text((WIDTH // 2, HEIGHT // 2 - 6), str(seed), fill="white", font=font, anchor="mm")
        info = PngInfo()
        info.add_text("parameters", webui_parameters("a neon sign", "worst quality, low quality", 20, 5.0, seed,
                                                     WIDTH, HEIGHT, 1.0, "checkpoint", lora_name))
        image.save(os.path.join(folder, f"{seed}.png"), pnginfo=info)
    return [f"{seed}.png" for seed in seeds]


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


@contextlib.contextmanager
def serving(sample_path, score_path):
    """score.py's server on the folder, in a thread of this process; yields its base URL."""
    settings = parse_settings([f"--sample_path={sample_path}", f"--score_path={score_path}",
                             "--score_port=0", "--score_open_browser=False"], score.USED_SETTINGS)
    server = score.make_server(settings)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
