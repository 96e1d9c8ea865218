"""utils/locks.py: one owner per folder, across processes; stale locks (a SIGKILLed owner, a reused pid,
another host long ago) are taken over; the lock goes on exit, also on an exception or Ctrl-C."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from utils.errors import UserError
from utils.locks import OTHER_HOST_STALE_S, FolderLock, folder_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ("import sys, time; sys.path.insert(0, {repo!r}); from utils.locks import folder_lock\n"
        "with folder_lock(sys.argv[1], 'generate'):\n    print('held', flush=True)\n    time.sleep(60)\n")


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/samples as `generate`; yields (folder, process)."""
    folder = tmp_path / "samples"
    process = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=REPO), str(folder)], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "held"
    yield folder, process
    process.kill()
    process.wait()


def test_a_live_owner_refuses_with_a_sentence_naming_stage_pid_and_folder(holder):
    folder, process = holder
    with pytest.raises(UserError) as refusal:
        with folder_lock(folder, "score"):
            pass
    message = str(refusal.value)
    assert f"{folder} is in use by generate (pid {process.pid} on {socket.gethostname()})" in message
    assert "\n" not in message
    assert json.loads((folder / ".lock").read_text())["pid"] == process.pid  # not taken, not removed


def test_a_sigkilled_owners_lock_is_stale_and_taken_over(holder, capsys):
    folder, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (folder / ".lock").exists()  # left behind, as a crash leaves it
    with folder_lock(folder, "score"):
        assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    assert "took over the stale lock" in capsys.readouterr().out
    assert not (folder / ".lock").exists()
    assert [n for n in os.listdir(folder)] == []


def write_lock(folder, **owner):
    folder.mkdir(exist_ok=True)
    (folder / ".lock").write_text(json.dumps({"stage": "train_policy", "started": "then", **owner}))


def test_a_reused_pid_is_another_process(tmp_path):
    # our own pid is running, but with another start time it is not the process that took the lock
    write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(), process_start=1)
    with folder_lock(tmp_path, "generate"):
        pass


def test_another_hosts_lock_counts_until_it_is_old(tmp_path):
    write_lock(tmp_path, pid=1, host="other-machine")
    with pytest.raises(UserError, match="train_policy \\(pid 1 on other-machine\\)"):
        FolderLock(tmp_path, "generate").acquire()
    old = time.time() - OTHER_HOST_STALE_S - 60
    os.utime(tmp_path / ".lock", (old, old))
    with folder_lock(tmp_path, "generate"):
        pass


def test_an_unreadable_lock_is_respected_while_fresh_then_stale(tmp_path):
    (tmp_path / ".lock").write_text("")  # its owner is between creating and writing it
    with pytest.raises(UserError, match="another program"):
        FolderLock(tmp_path, "generate").acquire()
    old = time.time() - 60
    os.utime(tmp_path / ".lock", (old, old))
    with folder_lock(tmp_path, "generate"):
        pass


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_the_lock_goes_on_an_exception_or_ctrl_c(tmp_path, error):
    with pytest.raises(error):
        with folder_lock(tmp_path, "generate"):
            assert (tmp_path / ".lock").exists()
            raise error()
    assert not (tmp_path / ".lock").exists()


def test_release_never_removes_another_owners_lock(tmp_path):
    lock = FolderLock(tmp_path, "generate").acquire()
    write_lock(tmp_path, pid=os.getpid() + 1, host=socket.gethostname())  # someone replaced it by hand
    lock.release()
    assert (tmp_path / ".lock").exists()


def outcome(process):
    """The process's first line that is not a note."""
    line = process.stdout.readline()
    while line.startswith("note:"):
        line = process.stdout.readline()
    return line.strip()


def test_many_processes_at_once_exactly_one_gets_it(tmp_path):
    folder = tmp_path / "samples"
    write_lock(folder, pid=2**22 + 12345, host=socket.gethostname())  # a stale lock all of them see at once
    release = tmp_path / "release"
    script = ("import os, sys, time; sys.path.insert(0, {repo!r}); from utils.errors import UserError\n"
              "from utils.locks import folder_lock\n"
              "try:\n    with folder_lock(sys.argv[1], 'generate'):\n        print('got', flush=True)\n"
              "        while not os.path.exists(sys.argv[2]): time.sleep(0.05)\n"
              "except UserError:\n    print('refused', flush=True)\n").format(repo=REPO)
    processes = [subprocess.Popen([sys.executable, "-c", script, str(folder), str(release)], stdout=subprocess.PIPE,
                                  text=True) for _ in range(4)]
    outcomes = sorted(outcome(process) for process in processes)  # the winner holds on meanwhile
    release.touch()
    for process in processes:
        process.communicate(timeout=60)
    assert outcomes == ["got"] + ["refused"] * 3
    assert not (folder / ".lock").exists()


def test_a_folder_that_is_a_file_is_a_sentence(tmp_path):
    (tmp_path / "samples").write_text("not a folder")
    with pytest.raises(UserError, match="cannot use .*samples as a folder"):
        FolderLock(tmp_path / "samples", "generate").acquire()


def test_a_folder_in_place_of_the_lock_is_a_sentence(tmp_path):
    (tmp_path / ".lock").mkdir()
    with pytest.raises(UserError, match="not one"):
        FolderLock(tmp_path, "generate").acquire()
    assert (tmp_path / ".lock").is_dir()
