"""Prompt sets: `prompt_file` holds one prompt per line, each line may hold `{a|b|c}` variants.

    # a comment; blank lines are ignored too
    a {red|blue} car at {dawn|night}
    a portrait of a cat

Each image's prompt is a pure function of its seed (prompt_for_seed): the same seed gives the same
prompt on a rerun, after a resume and on any number of processes, as it gives the same noise. An
empty prompt_file is the single `prompt` setting, exactly as without prompt sets.
"""

import functools
import hashlib
import itertools
import math
import os
import random
import re

from utils.errors import UserError

VARIANTS = re.compile(r"\{([^{}]*)\}")  # one {a|b|c} group, not nested (WebUI's Dynamic Prompts syntax)


def check_line(path, number, line):
    """Refuse a line whose braces do not pair up or hold an empty group; names the file and line."""
    without_groups = VARIANTS.sub("", line)
    if "{" in without_groups or "}" in without_groups:
        raise UserError(f"{path}, line {number}: the braces of {line!r} do not pair up (variants are written "
                        "{a|b|c}, not nested): fix that line.")
    for group in VARIANTS.findall(line):
        if not group.strip() or any(not variant.strip() for variant in group.split("|")):
            raise UserError(f"{path}, line {number}: {line!r} has an empty variant in {{{group}}}: fix that line.")


def read_numbered_prompt_file(path):
    """[(line number, prompt line)] of `path` (comments and blank lines dropped); UserError naming the file and line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise UserError(f"cannot read prompt_file {path} ({error.strerror}): check the path, or set "
                        "--prompt_file= to use the single prompt setting.") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text; save the file as UTF-8.") from None
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            check_line(path, number, line)
            lines.append((number, line))
    if not lines:
        raise UserError(f"prompt_file {path} holds no prompt (only comments or blank lines): write one prompt "
                        "per line, or set --prompt_file= to use the single prompt setting.")
    return lines


def read_prompt_file(path):
    """The prompt lines of `path` (comments and blank lines dropped); UserError naming the file and line."""
    return [line for _, line in read_numbered_prompt_file(path)]


def prompt_lines(settings):
    """The run's prompt lines: prompt_file's, or [prompt] when prompt_file is empty."""
    return read_prompt_file(settings.prompt_file) if settings.prompt_file else [settings.prompt]


def expand(line, rng):
    """`line` with each {a|b|c} group replaced by one of its variants, drawn from `rng` (random.Random)."""
    return VARIANTS.sub(lambda match: rng.choice(match.group(1).split("|")).strip(), line)


def variant_choices(line):
    """[[text], [variant, ...], [text], ...]: `line`'s literal parts and {a|b|c} groups, in order."""
    return [[part] if i % 2 == 0 else [variant.strip() for variant in part.split("|")]
            for i, part in enumerate(VARIANTS.split(line))]


def expansion_count(line):
    """How many texts `line` expands to (with repeats, if a group repeats a variant)."""
    return math.prod(len(choices) for choices in variant_choices(line))


def expansions(line):
    """Every distinct text `line` expands to; mind expansion_count first, the count multiplies per group."""
    return {"".join(choice) for choice in itertools.product(*variant_choices(line))}


def epoch_prompts(lines, seed, epoch, groups):
    """The prompts of a training epoch's `groups` prompt groups, a pure function of (seed, epoch), so a
    resume and any number of processes draw the same.

    The lines come in a shuffled order that goes through the whole list before any line repeats (laps of
    the list, each shuffled by seed and lap), as a data loader's epochs do; each group's variants are drawn
    once, so every image of a group has the same text. One line without variants gives that line always.
    """
    laps, prompts = {}, []
    for index in range((epoch - 1) * groups, epoch * groups):
        lap, position = divmod(index, len(lines))
        if lap not in laps:
            laps[lap] = random.Random(f"prompt lines {seed} {lap}").sample(range(len(lines)), len(lines))
        prompts.append(expand(lines[laps[lap][position]], random.Random(f"prompt variants {seed} {index}")))
    return prompts


# Previews show one prompt the LoRA was not trained on: the first of these not in the list.
HELD_OUT_PREVIEW_PROMPTS = ("a photo of a city street", "a photo of a living room")


def preview_prompts(settings):
    """The preview grid's prompts: train_preview_prompts (";"-separated), else the single prompt (without a
    prompt_file, as before prompt sets), else the list's first two lines and a prompt not in the list.
    Variants are drawn once, the same at every save, so previews compare across epochs."""
    if settings.train_preview_prompts.strip():
        lines = [part.strip() for part in settings.train_preview_prompts.split(";") if part.strip()]
    elif not settings.prompt_file:
        return [settings.prompt]
    else:
        listed = prompt_lines(settings)
        held_out = next(p for p in HELD_OUT_PREVIEW_PROMPTS if p not in listed)  # two differ: one is not listed
        lines = [*listed[:2], held_out]
    return [expand(line, random.Random(f"preview {number}")) for number, line in enumerate(lines)]


def prompt_summary(lines):
    """One line naming the prompts, for a plot's title or a description."""
    return repr(lines[0]) if len(lines) == 1 else f"{len(lines)} prompts ({lines[0]!r}, ...)"


def prompt_for_seed(lines, seed):
    """The prompt of the image with this seed: a line, then its variants, drawn by the seed alone.

    A list of one line without variants gives that line for every seed, so the single prompt is unchanged.
    """
    if len(lines) == 1 and not VARIANTS.search(lines[0]):
        return lines[0]
    rng = random.Random(seed)
    return expand(lines[rng.randrange(len(lines))], rng)


def longest_expansions(line, length=len):
    """`line` with each {a|b|c} group replaced by its longest variant by `length` (characters unless told, e.g.
    a tokenizer's count): the expansion a length check needs."""
    return VARIANTS.sub(lambda match: max((v.strip() for v in match.group(1).split("|")), key=length), line)


def token_count(tokenizer, text):
    """Tokens of `text` as its text encoder would get them before truncation, the start and end tokens included."""
    return len(tokenizer(text, truncation=False, verbose=False).input_ids)  # no warning: what is too long is said


def check_token_lengths(path, tokenizers):
    """Refuse a line of prompt file `path` whose longest expansion has more tokens than a text encoder reads
    (CLIP's 77, start and end included) for any of `tokenizers` (SDXL has two): the pipeline would cut it off."""
    for number, line in read_numbered_prompt_file(path):
        for tokenizer in tokenizers:
            longest = longest_expansions(line, length=functools.partial(token_count, tokenizer))
            count = token_count(tokenizer, longest)
            if count > tokenizer.model_max_length:
                raise UserError(f"{path}, line {number}: {longest!r} is {count} tokens, more than the "
                                f"{tokenizer.model_max_length} the text encoder reads, so it would be truncated: "
                                "shorten that line (or its longest variants).")


def prompt_set_parameters(path, lines):
    """What identifies a prompt file's prompts in a round's parameters (a change starts a new round) and
    in LoRA metadata: its absolute path, the sha256 of its prompt lines (comments left out) and the lines."""
    digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    return {"prompt_file": os.path.abspath(path), "prompt_lines_sha256": digest, "prompt_lines": lines}
