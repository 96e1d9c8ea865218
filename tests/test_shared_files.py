"""What leaves the author's machine tells nothing of it (issue 21): a LoRA is shared, and WebUI shows its
header to whoever loads it. The author's files here lie under a folder with a recognisable name
(secret_user_name_xyz); every file meant to be shared (the WebUI LoRA, the diffusers LoRA, the LoRA's card,
the preview grid, each sample PNG's parameters) is read back whole, header and text chunks, and must hold
neither that folder nor the home directory, while it still names the base model (file name and WebUI
hash), the reward model (name and SHA-256), the prompt, epoch, rank and alpha. SD1.5 and SDXL, the
checkpoint as one file and as a diffusers folder; in-process, then train_policy itself once per family.
"""

import json
import os
import shutil

import pytest
import torch
from ldm_checkpoint import write_single_file
from PIL import Image

import generate
from conftest import TINY_SETTINGS, assert_ok, run_scripts, stage_paths
from ddpo.lora import add_lora
from ddpo.reward_model import LatentRewardModel
from utils.checkpoint import sha256_of_file
from utils.cli import parse_settings
from utils.lora_files import epoch_files, lora_metadata, save_lora, save_lora_card
from utils.pipeline import decode_latents, load_pipeline
from utils.reward_files import save_reward_model
from utils.samples import parse_webui_parameters, read_png_parameters, round_images

SECRET = "secret_user_name_xyz"
PROMPT = "a red fox in the snow"
POLICY = ["--train_policy_num_epochs=1", "--train_save_freq=1", "--train_sample_batch_size=2",
          "--train_sample_num_batches_per_epoch=1", "--train_policy_batch_size=2", "--train_preview_seeds=0,1"]


def author_folder(root, family, tiny_folder):
    """The author's project folder under root/secret_user_name_xyz/: the tiny model as a diffusers folder and
    as one file, and a reward model of the family. Returns (folder, {"file": path, "folder": path})."""
    folder = root / SECRET / "AlmostPerfect"
    models = folder / "models"
    shutil.copytree(tiny_folder, models / f"tiny-{family}-diffusers")
    pipeline = load_pipeline(str(models / f"tiny-{family}-diffusers"), "cpu", torch.float32)
    write_single_file(pipeline, models / f"tiny-{family}.safetensors")
    torch.manual_seed(0)
    save_reward_model(LatentRewardModel(), str(models / "reward_model.safetensors"), {"family": family})
    return folder, {"file": str(models / f"tiny-{family}.safetensors"),
                    "folder": str(models / f"tiny-{family}-diffusers")}


def author_settings(folder, checkpoints, kind, *args):
    """The settings a stage of the author's would run with (as run_script passes them), for this checkpoint."""
    command_line = {**stage_paths(folder, checkpoints[kind]), **TINY_SETTINGS, "prompt": PROMPT,
                    "checkpoint_config": checkpoints["folder"] if kind == "file" else ""}
    return parse_settings([f"--{k}={v}" for k, v in command_line.items()] + list(args))


def safetensors_header(path):
    """The whole header of a .safetensors file (tensor names, dtypes, shapes, metadata) as it is on disk."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(length))


def png_text(path):
    """Every text chunk of a PNG (tEXt, zTXt, iTXt), decompressed."""
    with Image.open(path) as image:
        image.load()
        return {**image.info, **getattr(image, "text", {})}


def shared_values(path):
    """{where: value} of everything a shared file says about itself besides its pixels or tensors' values."""
    if str(path).endswith(".safetensors"):
        header = safetensors_header(path)
        return {"__header__": json.dumps(header), **header.get("__metadata__", {})}
    return {key: str(value) for key, value in png_text(path).items()}


def local_paths(root):
    """Strings that would tell a stranger where the author keeps files."""
    home = os.path.expanduser("~")
    marks = {SECRET, str(root), os.path.realpath(root)}
    return marks | ({home, os.path.realpath(home)} if len(home) > 1 else set())


def assert_no_local_path(paths, root):
    assert paths, "there must be shared files to check"
    for path in paths:
        leaks = {key: value for key, value in shared_values(path).items()
                 if any(mark in value for mark in local_paths(root))}
        assert not leaks, f"{os.path.basename(path)} tells where the author keeps files: {leaks}"


# ---------------------------------------------------------------- in-process: the writers themselves


@pytest.fixture(scope="module", params=[("sd15", "file"), ("sd15", "folder"), ("sdxl", "file"), ("sdxl", "folder")],
                ids=lambda p: "-".join(p))
def shared(request, tmp_path_factory, tiny_checkpoint, tiny_sdxl_checkpoint):
    """The author's LoRA of epoch 1 (both formats, with its card), then two images generated with it."""
    family, kind = request.param
    root = tmp_path_factory.mktemp("author")
    folder, checkpoints = author_folder(root, family, tiny_checkpoint if family == "sd15" else tiny_sdxl_checkpoint)
    settings = author_settings(folder, checkpoints, kind, "--generate_sample_size=2", "--generate_batch_size=2")
    pipeline = load_pipeline(settings.checkpoint_path, "cpu", torch.float32, settings.checkpoint_config)
    add_lora(pipeline.unet, settings.lora_rank)
    os.makedirs(settings.lora_path)
    metadata = lora_metadata(settings, 1, pipeline.unet, family)
    save_lora(pipeline.unet, settings.lora_path, 1, "", metadata, family)
    card = decode_latents(pipeline, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))[0]
    save_lora_card(settings.lora_path, 1, "", card)
    generate.main(settings)  # generate_lora=latest: the LoRA just saved
    return root, settings, checkpoints[kind], kind


def test_no_shared_file_holds_a_local_path(shared):
    root, settings, _, _ = shared
    files = epoch_files(settings.lora_path, 1)
    images = [os.path.join(settings.sample_path, name) for name in round_images(settings.sample_path)]
    assert len(images) == 2
    assert_no_local_path([files["ui"], files["diffusers"], files["card"], *images], root)


def test_the_lora_still_says_what_a_user_of_it_needs(shared):
    _, settings, checkpoint, kind = shared
    metadata = safetensors_header(epoch_files(settings.lora_path, 1)["ui"])["__metadata__"]
    short_hash = sha256_of_file(checkpoint)[:10] if kind == "file" else ""
    expected = {"ss_sd_model_name": os.path.basename(checkpoint), "almostperfect.checkpoint_hash": short_hash,
                "almostperfect.checkpoint": os.path.splitext(os.path.basename(checkpoint))[0],
                "almostperfect.reward_model": "reward_model.safetensors",
                "almostperfect.reward_model_sha256": sha256_of_file(settings.reward_model_path),
                "almostperfect.prompt": PROMPT, "almostperfect.epoch": "1", "ss_epoch": "1",
                "ss_network_dim": "4", "ss_network_alpha": "4.0"}
    assert {key: metadata.get(key) for key in expected} == expected
    name = os.path.basename(checkpoint)
    shown = f"{name} [{short_hash}]" if short_hash else name  # as WebUI's checkpoint list shows it
    assert f"load it on the base model {shown}." in metadata["ss_training_comment"]
    assert metadata["modelspec.description"] == metadata["ss_training_comment"]


def test_a_sample_png_names_the_model_as_webui_does_and_nothing_more(shared):
    _, settings, checkpoint, kind = shared
    for name in round_images(settings.sample_path):
        parameters = parse_webui_parameters(read_png_parameters(os.path.join(settings.sample_path, name)))
        assert parameters["settings"]["Model"] == os.path.splitext(os.path.basename(checkpoint))[0]
        assert parameters["settings"].get("Model hash") == (sha256_of_file(checkpoint)[:10] if kind == "file" else None)
        assert parameters["loras"] == [("ui_lora_epoch_1", "1")]
        assert parameters["prompt"] == f"{PROMPT} <lora:ui_lora_epoch_1:1>"


# ---------------------------------------------------------------- train_policy itself, once per family


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_checkpoint, tiny_sdxl_checkpoint):
    """train_policy run by the author (checkpoint file, tiny settings) for SD1.5 and SDXL side by side."""
    runs = {}
    for family, tiny in (("sd15", tiny_checkpoint), ("sdxl", tiny_sdxl_checkpoint)):
        root = tmp_path_factory.mktemp("author")
        runs[family] = (root, *author_folder(root, family, tiny))
    calls = [("train_policy", [*POLICY, f"--prompt={PROMPT}", f"--checkpoint_config={checkpoints['folder']}"],
              {"cwd": folder, "checkpoint": checkpoints["file"]}) for _, folder, checkpoints in runs.values()]
    results = run_scripts(calls)
    return {family: (root, folder, result) for (family, (root, folder, _)), result in zip(runs.items(), results)}


@pytest.mark.stages
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_what_train_policy_writes_for_sharing_holds_no_local_path(trained, family):
    root, folder, result = trained[family]
    assert_ok(result)
    files = epoch_files(str(folder / "outputs"), 1)
    assert_no_local_path([files["ui"], files["diffusers"], files["card"], files["preview"]], root)
    metadata = safetensors_header(files["ui"])["__metadata__"]
    assert metadata["ss_sd_model_name"] == f"tiny-{family}.safetensors"
    checkpoint = folder / "models" / f"tiny-{family}.safetensors"
    assert metadata["almostperfect.checkpoint_hash"] == sha256_of_file(checkpoint)[:10]
