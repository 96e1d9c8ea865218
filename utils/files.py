"""Files that stages hand to each other: written safely (temp file + rename), read safely."""

import contextlib
import errno
import json
import os
import re
import signal
import stat
import tempfile

_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) report a system error
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read, then put back: the only portable way to learn the umask


def replace_atomically(temp_path, path):
    """Rename a finished temp file over `path` in one step (a reader sees the old file or the new one).

    Its mode becomes what a plain open() would give (0666 less the umask): mkstemp and safetensors
    write files readable by their owner only, which a WebUI or ComfyUI running as another user
    (a container, a service) could not load.
    """
    os.chmod(temp_path, 0o666 & ~_UMASK)
    os.replace(temp_path, path)


def said_of(path, error, temp_path=None):
    """`error` as the user should read it: about `path`, their file, not the temp file it was written as.

    An OSError without a file name (a full disk shows up in write(), which names no file) or naming the
    temp file gets `path`, so that run_stage's sentence says which file could not be written; so does
    the system error inside a library's own exception (safetensors: "I/O error: ... (os error 28)").
    Returns the error to raise.
    """
    if isinstance(error, OSError):
        if error.filename is None or (temp_path and os.fspath(error.filename) == os.fspath(temp_path)):
            error.filename = path
            if error.filename2 is not None and os.fspath(error.filename2) == os.fspath(path):
                error.filename2 = None  # a rename of the temp file over `path`: one file to name
        return error
    system_error = _OS_ERROR.search(str(error))
    if system_error:
        number = int(system_error.group(1))
        return OSError(number, os.strerror(number), path)
    return error


@contextlib.contextmanager
def writing(path):
    """Around writing `temp path` (yielded) that is then renamed over `path`; on failure the temp file goes,
    and the error names `path` (said_of)."""
    temp_path = f"{path}.tmp"
    try:
        yield temp_path
        replace_atomically(temp_path, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError, NotADirectoryError):
            os.unlink(temp_path)
        raise said_of(path, error, temp_path)


@contextlib.contextmanager
def appending(path):
    """open(path, "a+b"), with `path` named in an OSError from write() (see writing)."""
    try:
        with open(path, "a+b") as f:
            yield f
    except OSError as error:
        if error.filename is None:
            error.filename = path
        raise


def write_json_atomic(path, obj):
    """Write obj as JSON so that a reader (or a crash) sees the old file or the new one, never half of one.

    The temporary file is in the same folder because a rename is atomic only within one file system.
    Errors name `path` (said_of).
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        handle, temp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as error:  # a read-only or missing folder: mkstemp names a random temp file
        error.filename = path
        raise
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data does
        replace_atomically(temp_path, path)
    except BaseException as error:
        os.unlink(temp_path)
        raise said_of(path, error, temp_path)


def parse_json(data):
    """json.loads, with a nesting too deep for Python's parser a ValueError like any other malformed JSON."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


_NOT_REGULAR = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a device",
                stat.S_IFBLK: "a device", stat.S_IFSOCK: "a socket"}


def read_regular_file(path):
    """The bytes of `path`; OSError (with a strerror that says what it is) unless it is a regular file.

    A FIFO would block the reader until some writer came (a page that never answers), a device would
    never end; O_NONBLOCK makes opening a FIFO return at once, and fstat then tells what was opened.
    """
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        kind = _NOT_REGULAR.get(stat.S_IFMT(mode), "something other than a file")
        raise OSError(errno.EINVAL, f"it is {kind}, not a regular file", path)
    with os.fdopen(descriptor, "rb") as f:
        return f.read()


def read_json(path):
    """The JSON in a regular file `path`; ValueError (which says why) if it is not JSON, not UTF-8, or nested
    too deeply; OSError if it cannot be read or is not a regular file (read_regular_file)."""
    return parse_json(read_regular_file(path))


def crash_point(name):
    """A test hook: with ALMOSTPERFECT_CRASH_AT=name in the environment, the process is SIGKILLed here.

    Tests use it to prove that a crash at that moment (a power cut, an OOM kill) loses nothing.
    """
    if os.environ.get("ALMOSTPERFECT_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


