"""Files that stages hand to each other: written safely (temp file + rename), and the scores format."""

import json
import os
import tempfile

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read, then put back: the only portable way to learn the umask


def publish(temp_path, path):
    """Rename a finished temp file over `path` in one step (a reader sees the old file or the new one).

    Its mode becomes what a plain open() would give (0666 less the umask): mkstemp and safetensors
    write files readable by their owner only, which a WebUI or ComfyUI running as another user
    (a container, a service) could not load.
    """
    os.chmod(temp_path, 0o666 & ~_UMASK)
    os.replace(temp_path, path)


def write_json_atomic(path, obj):
    """Write obj as JSON so that a reader (or a crash) sees the old file or the new one, never half of one.

    The temporary file is in the same folder because a rename is atomic only within one file system.
    """
    folder = os.path.dirname(os.path.abspath(path))
    handle, temp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data does
        publish(temp_path, path)
    except BaseException:
        os.unlink(temp_path)
        raise


MIN_SCORE, MAX_SCORE = -5, 5


def scores_format_problem(scores):
    """Why `scores` is not in the seed WebApp's format {"<file>.png": whole number in -5..+5}, or None."""
    if not isinstance(scores, dict):
        return f"not an object {{\"<seed>.png\": score}} but a {type(scores).__name__}"
    for name, score in scores.items():
        if isinstance(score, bool) or not isinstance(score, int) or not MIN_SCORE <= score <= MAX_SCORE:
            return f"not in the expected format (the score of {name!r} is {score!r}, not a whole number from -5 to 5)"
    return None


WINNERS = ("a", "b", "tie")  # a comparison's answer: a is better, b is better, about the same


def comparisons_format_problem(comparisons):
    """Why `comparisons` is not [{"a": "<file>.png", "b": "<file>.png", "winner": "a"|"b"|"tie"}, ...], or None."""
    if not isinstance(comparisons, list):
        return f'not a list [{{"a": "<seed>.png", "b": "<seed>.png", "winner": "a"}}, ...] but a {type(comparisons).__name__}'
    for number, entry in enumerate(comparisons, 1):
        if not (isinstance(entry, dict) and set(entry) == {"a", "b", "winner"} and isinstance(entry["a"], str)
                and isinstance(entry["b"], str) and entry["a"] != entry["b"] and entry["winner"] in WINNERS):
            return (f'not in the expected format (entry {number}, {entry!r}, is not {{"a": "<file>", "b": "<another '
                    f'file>", "winner": "a", "b" or "tie"}})')
    return None
