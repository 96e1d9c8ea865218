"""What shows whether a stage is learning: JSON-lines logs, curves, contact sheets."""

import contextlib
import json
import os

from utils.files import appending, writing


def append_jsonl(path, record):
    """One line per epoch; appending keeps earlier runs' lines (nothing is overwritten).

    A line cut short by a kill mid-write is ended first, so the new record starts on a line of its own.
    """
    with appending(path) as f:
        cut_short = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            cut_short = f.read(1) != b"\n"
        f.write((("\n" if cut_short else "") + json.dumps(record) + "\n").encode())


def read_jsonl(path):
    """The records (JSON objects) of a JSON-lines file; a line that is not one (cut short by a kill
    mid-write, or edited by hand) is skipped with a warning that names the file and line."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                print(f"warning: skipped line {number} of {path}, which is not a JSON record (cut short by a kill?)")
    return records


def plot_curves(path, records, x_key, panels, title, columns=3, marks=()):
    """A PNG with one panel per (panel title, keys), `columns` panels a row; temp file + rename.

    A key is a metric's name, or a (mean, spread) pair of names drawn as a line in a band. Where the
    records' "run" changes (a resumed run, e.g. with a new reward model), a dashed line marks it.
    `marks`: (x, text) drawn as a dotted line on every panel, the text on the first.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if _is_number(r.get(x_key))]  # a hand-edited line must not stop the plot
    rows, columns = -(-len(panels) // columns), min(columns, len(panels))
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    new_runs = [b[x_key] for a, b in zip(records, records[1:]) if a.get("run") != b.get("run")]
    for axis, (panel_title, keys) in zip(axes.flat, panels):
        for key in keys:
            mean, spread = key if isinstance(key, tuple) else (key, None)
            points = [(r[x_key], r[mean], r.get(spread, 0.0) if _is_number(r.get(spread)) else 0.0)
                      for r in records if _is_number(r.get(mean))]
            if not points:
                continue
            x, y, band = zip(*points)
            line = axis.plot(x, y, marker="o", markersize=3, label=f"{mean} ± {spread}" if spread else mean)[0]
            if spread:
                axis.fill_between(x, [a - b for a, b in zip(y, band)], [a + b for a, b in zip(y, band)],
                                  color=line.get_color(), alpha=0.2)
        for i, x in enumerate(new_runs):
            axis.axvline(x - 0.5, color="grey", linestyle="--", linewidth=1, label=None if i else "resumed")
        for x, text in marks:
            axis.axvline(x, color="green", linestyle=":", linewidth=1)
            if axis is axes.flat[0]:
                axis.annotate(text, (x, 1), xycoords=("data", "axes fraction"), fontsize=7, ha="center", va="top")
        axis.set_title(panel_title)
        axis.set_xlabel(x_key)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    save_figure(figure, path, title)


def save_figure(figure, path, title, dpi=100):
    """Title, lay out and write a matplotlib figure as a PNG (temp file + rename), then free it."""
    import matplotlib.pyplot as plt

    figure.suptitle(title)
    figure.tight_layout()
    with writing(path) as temp_path:
        figure.savefig(temp_path, dpi=dpi, format="png")
    plt.close(figure)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def contact_sheet(path, images, captions, thumbnail=128, columns=8):
    """A PNG of the images (PIL images or paths) in order, each fit to `thumbnail` px, its caption below.

    A caption may hold a newline. Temp file + rename.
    """
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    caption_height = 34
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * thumbnail, rows * (thumbnail + caption_height)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=13)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * thumbnail, (i // columns) * (thumbnail + caption_height)
        with Image.open(image) if isinstance(image, (str, os.PathLike)) else contextlib.nullcontext(image) as image:
            image = ImageOps.contain(image.convert("RGB"), (thumbnail - 4, thumbnail - 4))
        sheet.paste(image, (x + (thumbnail - image.width) // 2, y + (thumbnail - image.height) // 2))
        draw.multiline_text((x + thumbnail // 2, y + thumbnail), caption, fill="black", font=font, anchor="ma",
                            align="center", spacing=2)
    with writing(path) as temp_path:
        sheet.save(temp_path, format="PNG")
