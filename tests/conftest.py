"""Shared by the tests: the tiny SD1.5- and SDXL-shaped checkpoints, and running a stage script as a user would.

Every test that runs a script gives it a folder of its own: all paths point into it and it is the
working directory, so no test can touch the repository's models/, samples/ or outputs/.
"""

import hashlib
import importlib
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ddpo.lora import add_lora  # noqa: E402
from ddpo.reward_model import LatentRewardModel  # noqa: E402
from ddpo.sampling import Denoiser, sdxl_time_ids  # noqa: E402
from tools.tiny_checkpoint import (  # noqa: E402
    CROSS_ATTENTION_DIM,
    SDXL_CROSS_ATTENTION_DIM,
    SDXL_POOLED_DIM,
    build_tiny_checkpoint,
    build_tiny_sdxl_checkpoint,
    sd15_scheduler,
    tiny_unet,
)
from utils.cli import run_stage, stage_paths  # noqa: E402
from utils.reward_files import save_reward_model  # noqa: E402

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


@dataclass(frozen=True)
class Family:
    """What a test of both model families needs to know of one, as diffusers' pipeline tests keep a tester
    config per pipeline (get_dummy_components, get_dummy_inputs): the tests themselves are written once."""
    name: str  # "sd15" or "sdxl", as utils.checkpoint.model_family says
    label: str  # as messages name the family
    checkpoint_fixture: str  # the session fixture that builds its tiny checkpoint folder
    pipeline_class: type
    attention_linears: int  # the real architecture's attention projections the LoRA targets
    cross_attention_dim: int  # the tiny checkpoint's

    def unet_inputs(self):
        """Keyword arguments of a UNet call on 2 random 64x64 latents (seeded) at timesteps 901 and 301, with
        for SDXL its added conditioning (a pooled embedding and the size ids)."""
        generator = torch.Generator().manual_seed(0)
        inputs = {"sample": torch.randn(2, 4, 8, 8, generator=generator), "timestep": torch.tensor([901, 301]),
                  "encoder_hidden_states": torch.randn(2, 77, self.cross_attention_dim, generator=generator)}
        if self.name == "sdxl":
            inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, SDXL_POOLED_DIM, generator=generator),
                                           "time_ids": sdxl_time_ids(64, 64).expand(2, -1)}
        return inputs


FAMILIES = {
    "sd15": Family("sd15", "SD1.x", "tiny_checkpoint", StableDiffusionPipeline, 128, CROSS_ATTENTION_DIM),
    # 70 transformer blocks (down 2x1 + 2x10, mid 10, up 3x10 + 3x2) x 2 attentions x 4 projections
    "sdxl": Family("sdxl", "SDXL", "tiny_sdxl_checkpoint", StableDiffusionXLPipeline, 560, SDXL_CROSS_ATTENTION_DIM),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """Each model family in turn (a module's tests run for SD1.5, then for SDXL); a test of one family only
    says so with @pytest.mark.parametrize("family", ["sdxl"], indirect=True)."""
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def family_checkpoint(family, request):
    """Path of the tiny checkpoint folder of the family under test."""
    return request.getfixturevalue(family.checkpoint_fixture)


@pytest.fixture(scope="session")
def random_reward_model(tmp_path_factory):
    """Path of an untrained latent reward CNN (seeded), for stages that need one but not a taste."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("reward") / "reward_model.safetensors"
    save_reward_model(LatentRewardModel(), str(path), {})
    return str(path)


def tiny_denoiser(guidance_scale, eta, dtype=torch.float32, autocast=nullcontext):
    """A Denoiser of the tiny UNet (weights in `dtype`) with a rank-4 fp32 LoRA and random prompt embeddings.

    lora_B is drawn at random rather than peft's zeros, which would leave every lora_A without a gradient.
    """
    torch.manual_seed(0)
    unet = tiny_unet().to(dtype)
    add_lora(unet, rank=4)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    positive, negative = (torch.randn(1, 77, CROSS_ATTENTION_DIM, generator=torch.Generator().manual_seed(i)).to(dtype)
                          for i in (1, 2))
    return Denoiser(unet, sd15_scheduler(), positive, negative, guidance_scale, eta, autocast=autocast)


# The test being set up, and whether it is marked `stages`: a stage script run in a subprocess costs 10-20 s,
# so every test that runs one (itself or through a fixture) carries the marker, and `-m "not slow and not
# stages"` stays an edit loop of a few minutes. stage_command refuses to run for a test without it.
CURRENT_TEST = {"id": None, "stages": False}


def pytest_collection_modifyitems(config, items):
    """Modules of slow tests only first, then those with some, then the rest (stable within each): with a
    worker per core (pyproject.toml) the minutes-long tests then start at once beside the others instead
    of running alone at the end."""
    slow, fast = ({item.module.__name__ for item in items if bool(item.get_closest_marker("slow")) == marked}
                  for marked in (True, False))
    items.sort(key=lambda item: (item.module.__name__ not in slow) + (item.module.__name__ in fast))  # 0 all slow


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before the fixtures are set up: a module-scoped fixture runs its scripts for the first test that needs it."""
    CURRENT_TEST.update(id=item.nodeid, stages=item.get_closest_marker("stages") is not None)


def run_script(name, *args, cwd, checkpoint=None, timeout=300, env=None):
    """Run `<repo>/<name>.py` in a subprocess with every path in `cwd` and TINY_SETTINGS, then `args`.

    Returns the CompletedProcess (text stdout/stderr captured). `checkpoint`: see stage_paths; `env`:
    variables to set on top of this process's environment.
    Each process gets one CPU thread unless OMP_NUM_THREADS is set: several PyTorch processes on a
    small machine, each spinning up a thread per core, run many times slower than one thread each.
    """
    command, env = stage_command(name, *args, cwd=cwd, checkpoint=checkpoint, env=env)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def stage_command(name, *args, cwd, checkpoint=None, env=None):
    """(command, environment) that run_script runs; for a test that needs the process itself (Popen)."""
    if not CURRENT_TEST["stages"]:
        pytest.fail(f"{CURRENT_TEST['id']} runs the stage script {name}.py in a subprocess: mark the test with "
                    "@pytest.mark.stages (or its module: pytestmark = pytest.mark.stages)", pytrace=False)
    settings = {**stage_paths(cwd, checkpoint), **TINY_SETTINGS}
    command = [sys.executable, str(REPO / f"{name}.py"), *(f"--{k}={v}" for k, v in settings.items()), *args]
    return command, {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}


@contextmanager
def running_stage(name, *args, cwd, checkpoint=None, until):
    """A stage script started in the background; the block runs once it has printed a line containing `until`,
    and the process is killed after it. Yields the Popen (its pid, poll())."""
    command, env = stage_command(name, *args, cwd=cwd, checkpoint=checkpoint, env={"PYTHONUNBUFFERED": "1"})
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        while until not in (line := process.stdout.readline()):
            assert line, f"{name}.py ended before printing {until!r}"
        yield process
    finally:
        process.kill()
        process.wait()


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


def assert_refused(result, *words):
    """Exit 2, exactly one stderr line "error: ..." holding every word, no traceback; returns the line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def run_in_process(name, *args, cwd, checkpoint=None):
    """run_script's command line through the stage's own run_stage, in this process: the same settings, the same
    refusal (exit code, one stderr line), without the seconds of a new process. For variants of a mistake whose
    contract one run_script already holds. Returns a CompletedProcess of what the stage printed."""
    stage = importlib.import_module(name)
    settings = {**stage_paths(cwd, checkpoint), **TINY_SETTINGS}
    argv = [f"{name}.py", *(f"--{k}={v}" for k, v in settings.items()), *args]
    stdout, stderr, returncode = io.StringIO(), io.StringIO(), 0
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(stdout), redirect_stderr(stderr):
        patch.chdir(cwd)
        patch.setattr(sys, "argv", argv)
        try:
            run_stage(stage.main, stage.USED_SETTINGS)
        except SystemExit as exit_:
            returncode = exit_.code
    return subprocess.CompletedProcess(argv, returncode, stdout.getvalue(), stderr.getvalue())


def snapshot(folder):
    """{relative path: (size, mtime_ns, sha256)} of every file under `folder`, to prove nothing changed."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def generators(seeds):
    """One CPU generator per image, as a pipeline takes them for reproducible batches."""
    return [torch.Generator().manual_seed(s) for s in seeds]


FP16_ATOL = 2e-3  # latents are saved in fp16: |x| < 4 rounds by at most 0.001


def assert_same_image(folder_a, folder_b, name):
    """The image `name` of two rounds made by two code paths (e.g. a checkpoint loaded from its file and from
    its folder) is the same within rounding: those paths may sum floats in another order, so the saved
    latents may differ by an fp16 step and a pixel by 1 of 255, depending on the CPU."""
    from PIL import Image

    from utils.samples import latent_file, load_latent
    with Image.open(Path(folder_a) / name) as a, Image.open(Path(folder_b) / name) as b:
        pixels_a, pixels_b = (torch.from_numpy(np.asarray(image).astype(np.int16)) for image in (a, b))
    assert pixels_a.shape == pixels_b.shape and (pixels_a - pixels_b).abs().max() <= 1, name
    torch.testing.assert_close(load_latent(latent_file(str(folder_a), name)),
                               load_latent(latent_file(str(folder_b), name)), atol=FP16_ATOL, rtol=1e-3)


def assert_made_with_lora(pipeline, lora_file, latents, latents_of):
    """`latents` (saved in fp16) are what `latents_of(pipeline)` makes with `lora_file` loaded by diffusers'
    load_lora_weights, and are not what it makes without: every image differs by well over the rounding."""
    assert (latents - latents_of(pipeline)).abs().amax(dim=(1, 2, 3)).min() > 10 * FP16_ATOL, \
        "the LoRA must change every image"
    pipeline.load_lora_weights(str(lora_file))
    try:
        torch.testing.assert_close(latents, latents_of(pipeline), atol=FP16_ATOL, rtol=1e-3)
    finally:
        pipeline.unload_lora_weights()


@torch.no_grad()
def merge_webui_lora(linears, state):
    """Merge a WebUI (kohya) LoRA file's tensors into the UNet as WebUI does: W += (alpha / rank) · up · down
    for each {kohya module name: nn.Linear} in `linears`, computed in the weight's dtype."""
    for name, linear in linears.items():
        down, up, alpha = (state[f"{name}.{part}"].to(linear.weight.dtype)
                           for part in ("lora_down.weight", "lora_up.weight", "alpha"))
        linear.weight += alpha / down.shape[0] * up @ down


@pytest.fixture
def checkpoint_recomputations(monkeypatch):
    """A list that grows by one each time torch.utils.checkpoint.checkpoint runs: proof that checkpointing is on."""
    checkpoint, calls = torch.utils.checkpoint.checkpoint, []

    def counted_checkpoint(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted_checkpoint)
    return calls
