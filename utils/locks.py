"""One stage at a time on a folder: a lock file `<folder>/.lock` that names its owner.

    with folder_lock(settings.sample_path, "generate"):
        ...  # nobody else writes this folder until the block ends (also on an exception or Ctrl-C)

    lock = FolderLock(settings.lora_path, "train_policy")   # the same, where a with-block does not fit
    lock.acquire()          # UserError if another live process holds it
    ...
    lock.release()          # removes the file only if it is still ours

The file is created atomically (O_CREAT | O_EXCL) and holds JSON {"pid", "host", "stage", "started",
"process_start"}. A second process is refused with one sentence that names the stage, its pid and the
folder. A lock whose owner is gone is stale and is taken over: on this host when the pid is not running
(or is running but is another process, told by its start time in /proc), on another host (a shared
network folder) when it is older than OTHER_HOST_STALE_S. A SIGKILL leaves the file behind; the next
start recognises it as stale. Threads of one process share a pid, so a second lock in the same process
is refused too. Under `accelerate launch`, only the main process takes the lock (it speaks for all of
them; when it is refused and exits, the launcher stops the others).
"""

import json
import os
import socket
import time

from utils.errors import UserError

LOCK_NAME = ".lock"
OTHER_HOST_STALE_S = 24 * 3600  # no way to ask another machine whether its pid still runs: trust a day
UNWRITTEN_GRACE_S = 10  # an empty lock file this young is being written by its owner right now


def _process_start(pid):
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22; the name in () may hold spaces
    except (OSError, IndexError, ValueError):
        return None


def _pid_max():
    """The largest pid this system hands out (Linux /proc), or 2**22, Linux's ceiling, where unknown."""
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2**22


def _pid_running(pid):
    """Whether a process `pid` runs. A pid no process can have (0, negative, too large; a hand-edited or
    foreign lock) runs nothing: os.kill would signal a process group (0, -1) or overflow."""
    if type(pid) is not int or not 0 < pid <= _pid_max():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _owner_is_alive(owner, age_s):
    """Whether the process that wrote `owner` (the lock's JSON) may still be running."""
    if owner.get("host") != socket.gethostname():
        return age_s < OTHER_HOST_STALE_S
    pid = owner.get("pid")
    if not _pid_running(pid):
        return False
    started = owner.get("process_start")
    return started is None or _process_start(pid) in (None, started)  # a reused pid is another process


class FolderLock:
    def __init__(self, folder, stage):
        self.folder, self.stage = folder, stage
        self.path = os.path.join(folder, LOCK_NAME)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "process_start": _process_start(os.getpid())}
        self.held = False

    def acquire(self):
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as error:  # a file of that name, no permission
            raise UserError(f"cannot use {self.folder} as a folder ({error.strerror}): check that path and its "
                            "permissions (a file where a folder should be?).") from None
        for _ in range(3):  # a stale lock is moved aside, then the creation is tried again
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as error:  # a read-only folder
                raise UserError(f"cannot write the lock file {self.path} ({error.strerror}): {self.stage} needs "
                                f"to write in {self.folder}.") from None
            try:
                with os.fdopen(handle, "w") as f:
                    json.dump(self.owner, f)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as error:  # a full disk: the file was created, its content could not be written
                os.unlink(self.path)
                error.filename = self.path  # run_stage's sentence names the lock file
                raise
            self.held = True
            return self
        raise UserError(f"cannot lock {self.folder}: {self.path} keeps coming back; another program is "
                        "starting on this folder at the same time. Wait a moment and run again.")

    def _read(self, path):
        """(owner dict or None if unreadable, the raw bytes, age in seconds); age None if the file is gone."""
        try:
            age = time.time() - os.stat(path).st_mtime
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None, None, None
        except OSError:  # unreadable: its owner's to judge by age alone
            return None, None, age
        try:
            owner = json.loads(raw)
        except ValueError:
            owner = None
        return (owner if isinstance(owner, dict) else None), raw, age

    def _take_over_if_stale(self):
        if os.path.lexists(self.path) and not os.path.isfile(self.path):
            raise UserError(f"{self.path} is in the way of {self.stage}'s lock file and is not one (a folder or a "
                            "link?); move it away and run again.")
        owner, raw, age = self._read(self.path)
        if age is None:
            return  # released meanwhile: try again
        if owner is None and age < UNWRITTEN_GRACE_S:
            owner = {"stage": "another program", "pid": "?", "host": socket.gethostname()}
        elif owner is None or not _owner_is_alive(owner, age):
            self._remove_stale(raw, owner)
            return
        raise UserError(f"{self.folder} is in use by {self._describe(owner)} since {owner.get('started', '?')}: "
                        f"wait for it to finish or stop it, then run again (if no such process runs, "
                        f"delete {self.path}).")

    def _remove_stale(self, stale_raw, owner):
        """Move the stale lock aside and delete it; a fresh lock moved aside by a race is put back.

        Two processes may judge the same lock stale; the second one's rename could then catch the
        first one's new lock, which the comparison of contents detects.
        """
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        _, raw, _ = self._read(aside)
        if raw == stale_raw:
            print(f"note: took over the stale lock {self.path} (left by {self._describe(owner)}, no longer running)")
        else:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        os.unlink(aside)

    @staticmethod
    def _describe(owner):
        if not owner:
            return "a process that left an unreadable lock"
        return f"{owner.get('stage', '?')} (pid {owner.get('pid', '?')} on {owner.get('host', '?')})"

    def release(self):
        """Remove the lock file if it is still this process's (never another's)."""
        if not self.held:
            return
        self.held = False
        owner, _, _ = self._read(self.path)
        if owner and owner.get("pid") == self.owner["pid"] and owner.get("host") == self.owner["host"]:
            os.unlink(self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def folder_lock(folder, stage):
    """Context manager: hold `<folder>/.lock` as `stage` for the block; see the module docstring."""
    return FolderLock(folder, stage)
