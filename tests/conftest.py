"""Shared by the tests: the tiny SD1.5- and SDXL-shaped checkpoints, and running a stage script as a user would.

Every test that runs a script gives it a folder of its own: all paths point into it and it is the
working directory, so no test can touch the repository's models/, samples/ or outputs/.
"""

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.cli import stage_paths  # noqa: E402
from utils.tiny_checkpoint import build_tiny_checkpoint, build_tiny_sdxl_checkpoint  # noqa: E402

# The tiny models gain nothing from threads, and on a small machine shared with other work PyTorch's
# per-core threads make them many times slower. OMP_NUM_THREADS, when set, wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

# Small and fast: 64x64 images (8x8 latents), 2 DDIM steps, rank-4 LoRA. Arguments given to
# run_script come after these, and the last --name=value on a command line wins.
TINY_SETTINGS = {"device": "cpu", "height": 64, "width": 64, "num_inference_steps": 2, "lora_rank": 4}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a tiny diffusers checkpoint on disk (built once per test session)."""
    return str(build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_checkpoint"))))


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tmp_path_factory):
    """Path of a tiny diffusers SDXL checkpoint on disk (built once per test session)."""
    return str(build_tiny_sdxl_checkpoint(str(tmp_path_factory.mktemp("tiny_sdxl_checkpoint"))))


def run_script(name, *args, cwd, checkpoint=None, timeout=300):
    """Run `<repo>/<name>.py` in a subprocess with every path in `cwd` and TINY_SETTINGS, then `args`.

    Returns the CompletedProcess (text stdout/stderr captured). `checkpoint`: see stage_paths.
    Each process gets one CPU thread unless OMP_NUM_THREADS is set: several PyTorch processes on a
    small machine, each spinning up a thread per core, run many times slower than one thread each.
    """
    settings = {**stage_paths(cwd, checkpoint), **TINY_SETTINGS}
    command = [sys.executable, str(REPO / f"{name}.py"), *(f"--{k}={v}" for k, v in settings.items()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_scripts(calls):
    """run_script for each (name, args, keyword arguments) in `calls`, one process per CPU (at most 4) at a time.

    Most of a short run is importing torch and diffusers, so independent runs go faster side by side.
    Returns the CompletedProcesses in the order of `calls`.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=min(cpus, 4)) as pool:
        futures = [pool.submit(run_script, name, *args, **kwargs) for name, args, kwargs in calls]
        return [future.result() for future in futures]


def assert_ok(result):
    """Assert a run_script result exited 0; on failure show its output."""
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    return result


def snapshot(folder):
    """{relative path: (size, mtime_ns, sha256)} of every file under `folder`, to prove nothing changed."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}
