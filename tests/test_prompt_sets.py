"""Prompt sets (prompt_file, utils/prompts.py) in generate and train_reward, on the tiny checkpoints.

Each image's prompt is a pure function of its seed; round.json and each PNG's parameters carry it; a
one-line file is the `prompt` setting exactly; a changed file is a new round; the ranking loss pairs
scores only within a prompt. Stage runs are subprocesses (several side by side where they are
independent); the rest is in-process.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

import generate
import train_reward
from conftest import (
    FP16_ATOL,
    REPO,
    TINY_SETTINGS,
    assert_ok,
    assert_same_image,
    generators,
    run_script,
    run_scripts,
    snapshot,
    stage_command,
)
from ddpo.lora import add_lora
from ddpo.reward_training import Ratings, objective, score_loss, score_ranking_loss
from tools.tiny_checkpoint import tiny_tokenizer, tiny_unet
from utils.cli import parse_settings, stage_paths
from utils.errors import UserError
from utils.lora_files import save_lora, ui_lora_name
from utils.pipeline import load_pipeline, text_tokenizers
from utils.prompts import check_token_lengths, prompt_for_seed, read_prompt_file
from utils.samples import latent_file, load_latent, parse_webui_parameters, read_png_parameters, save_latent

PROMPT_FILE = ("# a comment, and a blank line below\n\n"
               "a {red|blue} car at {dawn|night}\na cat in the rain  # a note\nfog\n")
LINES = ["a {red|blue} car at {dawn|night}", "a cat in the rain", "fog"]
SEEDS = [0, 1, 2, 3, 4, 5]
NO_LORA = "--generate_lora=none"


def stage_settings(folder, checkpoint, *args):
    """The settings generate.py sees when run_script runs it with `args` in `folder`."""
    values = {**stage_paths(str(folder), checkpoint), **TINY_SETTINGS}
    return parse_settings([*(f"--{k}={v}" for k, v in values.items()), *args], generate.USED_SETTINGS)


def plan_seeds(folder, checkpoint, seeds, *args):
    """round.json of a round of these seeds, with the parameters generate gives `args`: generate then makes
    exactly these images (two runs can be compared seed by seed; generate itself draws seeds at random)."""
    settings = stage_settings(folder, checkpoint, *args)
    os.makedirs(settings.sample_path, exist_ok=True)
    parameters = generate.round_parameters(settings, generate.resolve_lora(settings))
    with open(os.path.join(settings.sample_path, "round.json"), "w") as f:
        json.dump({"parameters": parameters, "seeds": seeds}, f)


def write_prompt_file(path, text=PROMPT_FILE):
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def round_json(samples):
    with open(samples / "round.json") as f:
        return json.load(f)


def png_prompts(samples):
    """{seed: the prompt in its PNG's parameters} of every image of the round."""
    return {int(p.stem): parse_webui_parameters(read_png_parameters(p))["prompt"] for p in samples.glob("*.png")}


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, "cpu", torch.float32)


@pytest.fixture(scope="module")
def zero_lora(tmp_path_factory):
    """A diffusers LoRA file of the tiny UNet as peft initialises it (lora_B = 0): it changes no pixel, but
    generate tags every image's prompt with it."""
    torch.manual_seed(0)
    unet = tiny_unet()
    add_lora(unet, rank=4)
    diffusers_path, _ = save_lora(unet, str(tmp_path_factory.mktemp("zero_lora")), 1)
    return diffusers_path


# ---------------------------------------------------------------- no prompt file: as before


def test_without_a_prompt_file_the_round_is_recorded_as_before(tmp_path, tiny_checkpoint):
    settings = stage_settings(tmp_path, tiny_checkpoint, "--prompt=a fox")
    parameters = generate.round_parameters(settings, None)
    assert list(parameters) == ["checkpoint", "lora", "prompt", "negative_prompt", "height", "width", "steps",
                                "guidance_scale", "eta"]
    assert parameters["prompt"] == "a fox"
    os.makedirs(settings.sample_path)
    generate.plan_round(settings, parameters)
    assert list(round_json(tmp_path / "samples")) == ["parameters", "seeds"]  # no "prompts"


# ---------------------------------------------------------------- a round of several prompts


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    return write_prompt_file(tmp_path_factory.mktemp("prompts") / "prompts.txt")


@pytest.fixture(scope="module")
def mixed_round(tmp_path_factory, tiny_checkpoint, prompt_file, zero_lora):
    """generate with the prompt file and a LoRA, batches of 4 mixing prompts: (samples folder, its args)."""
    folder = tmp_path_factory.mktemp("mixed_round")
    args = [f"--prompt_file={prompt_file}", f"--generate_lora={zero_lora}", f"--generate_sample_size={len(SEEDS)}",
            "--generate_batch_size=4"]
    assert len({prompt_for_seed(LINES, seed) for seed in SEEDS[:4]}) > 1, "the first batch must mix prompts"
    plan_seeds(folder, tiny_checkpoint, SEEDS, *args)
    assert_ok(run_script("generate", *args, cwd=folder, checkpoint=tiny_checkpoint))
    return folder / "samples", args


@pytest.mark.stages
def test_round_json_and_every_png_carry_each_seeds_own_prompt(mixed_round, prompt_file, zero_lora):
    samples, _ = mixed_round
    current = round_json(samples)
    assert current["seeds"] == SEEDS
    assert current["prompts"] == {str(seed): prompt_for_seed(LINES, seed) for seed in SEEDS}
    parameters = current["parameters"]
    assert "prompt" not in parameters  # the file's lines replace the single prompt
    assert parameters["prompt_file"] == str(prompt_file) and parameters["prompt_lines"] == LINES
    tag = f"<lora:{ui_lora_name(zero_lora)}:1>"
    assert png_prompts(samples) == {seed: f"{prompt_for_seed(LINES, seed)} {tag}" for seed in SEEDS}
    assert all("{" not in prompt for prompt in current["prompts"].values())  # variants chosen


@pytest.mark.stages
def test_each_image_of_a_mixed_batch_is_its_own_prompts_image(mixed_round, pipeline):
    samples, _ = mixed_round
    for prompt in {prompt_for_seed(LINES, seed) for seed in SEEDS}:
        seeds = [seed for seed in SEEDS if prompt_for_seed(LINES, seed) == prompt]
        with torch.no_grad():
            expected = pipeline(prompt, negative_prompt="worst quality, low quality", height=64, width=64,
                                num_inference_steps=2, guidance_scale=5.0, eta=1.0, num_images_per_prompt=len(seeds),
                                generator=generators(seeds), output_type="latent").images
        saved = torch.stack([load_latent(latent_file(str(samples), f"{seed}.png")) for seed in seeds])
        torch.testing.assert_close(saved, expected, atol=FP16_ATOL, rtol=1e-3)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_batch_of_several_prompts_makes_each_image_as_its_prompt_alone(family, request):
    checkpoint = request.getfixturevalue({"sd15": "tiny_checkpoint", "sdxl": "tiny_sdxl_checkpoint"}[family])
    pipeline = load_pipeline(checkpoint, "cpu", torch.float32)
    prompts, seeds = ["a red car", "a cat", "a red car"], [7, 8, 9]
    common = {"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 5.0, "eta": 1.0,
              "output_type": "latent"}
    with torch.no_grad():
        batch = pipeline(**generate.batch_prompts(prompts, "blurry"), generator=generators(seeds), **common).images
        alone = torch.cat([pipeline(**generate.batch_prompts([p], "blurry"), generator=generators([s]), **common).images
                           for p, s in zip(prompts, seeds)])
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-4)
    assert (batch[0] - batch[1]).abs().max() > 1e-2  # and the prompts do make other images


@pytest.mark.stages
def test_one_line_file_makes_the_same_images_as_the_prompt_setting(tmp_path, tiny_checkpoint):
    line = "a lighthouse at dusk"
    one_line = write_prompt_file(tmp_path / "one.txt", f"# one prompt\n{line}\n")
    common = [NO_LORA, "--generate_sample_size=3", "--generate_batch_size=2"]
    runs = {"prompt": [f"--prompt={line}"], "file": [f"--prompt_file={one_line}", "--prompt=not this one"]}
    for name, args in runs.items():
        plan_seeds(tmp_path / name, tiny_checkpoint, [3, 4, 5], *common, *args)
    for result in run_scripts([("generate", [*common, *args], {"cwd": tmp_path / name, "checkpoint": tiny_checkpoint})
                               for name, args in runs.items()]):
        assert_ok(result)
    by_prompt, by_file = tmp_path / "prompt" / "samples", tmp_path / "file" / "samples"
    for seed in [3, 4, 5]:
        assert_same_image(by_prompt, by_file, f"{seed}.png")
        assert read_png_parameters(by_prompt / f"{seed}.png") == read_png_parameters(by_file / f"{seed}.png")
    assert round_json(by_file)["prompts"] == {"3": line, "4": line, "5": line}


@pytest.mark.stages
def test_an_interrupted_and_resumed_round_keeps_each_seeds_prompt(tmp_path, tiny_checkpoint, prompt_file):
    args = [f"--prompt_file={prompt_file}", NO_LORA, "--generate_batch_size=1"]
    assert_ok(run_script("generate", *args, "--generate_sample_size=2", cwd=tmp_path, checkpoint=tiny_checkpoint))
    samples = tmp_path / "samples"
    first = round_json(samples)
    command, env = stage_command("generate", *args, "--generate_sample_size=5", cwd=tmp_path,
                                 checkpoint=tiny_checkpoint, env={"ALMOSTPERFECT_CRASH_AT": "generate.latent_saved"})
    killed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    grown = round_json(samples)
    assert grown["seeds"][:2] == first["seeds"] and len(grown["seeds"]) == 5
    assert {seed: grown["prompts"][seed] for seed in first["prompts"]} == first["prompts"]

    resumed = assert_ok(run_script("generate", *args, "--generate_sample_size=5", cwd=tmp_path,
                                   checkpoint=tiny_checkpoint))
    assert "2 of 5 images already made, generating 3" in resumed.stdout
    final = round_json(samples)
    assert final == grown and not (samples / "history").exists()
    expected = {seed: prompt_for_seed(LINES, seed) for seed in final["seeds"]}
    assert {int(seed): prompt for seed, prompt in final["prompts"].items()} == expected == png_prompts(samples)


def launch_two_processes(*args, cwd, checkpoint):
    """generate.py through `accelerate launch` on 2 CPU processes (gloo), as tests/test_multiprocess.py runs stages."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = {**stage_paths(str(cwd), checkpoint), **TINY_SETTINGS}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}",
               str(REPO / "generate.py"), *(f"--{k}={v}" for k, v in settings.items()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return assert_ok(subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300))


@pytest.mark.stages
def test_two_processes_give_each_seed_the_prompt_and_image_one_process_gives(mixed_round, tmp_path, tiny_checkpoint):
    samples, args = mixed_round
    plan_seeds(tmp_path, tiny_checkpoint, SEEDS, *args)
    launch_two_processes(*args, cwd=tmp_path, checkpoint=tiny_checkpoint)
    two = tmp_path / "samples"
    assert round_json(two) == round_json(samples)
    assert png_prompts(two) == png_prompts(samples)
    for seed in SEEDS:
        assert_same_image(samples, two, f"{seed}.png")


@pytest.mark.stages
def test_a_changed_prompt_file_starts_a_new_round_and_keeps_the_old_one(tmp_path, tiny_checkpoint):
    path = write_prompt_file(tmp_path / "prompts.txt")
    args = [f"--prompt_file={path}", NO_LORA, "--generate_sample_size=2"]
    assert_ok(run_script("generate", *args, cwd=tmp_path, checkpoint=tiny_checkpoint))
    samples = tmp_path / "samples"
    before = {name: entry for name, entry in snapshot(samples).items() if name != ".lock"}
    write_prompt_file(path, PROMPT_FILE + "a tree\n")
    result = assert_ok(run_script("generate", *args, cwd=tmp_path, checkpoint=tiny_checkpoint))
    assert "moved the earlier round to" in result.stdout
    assert snapshot(samples / "history" / "round_001") == before  # every file of it, byte for byte
    assert round_json(samples)["parameters"]["prompt_lines"] == [*LINES, "a tree"]
    assert len(list(samples.glob("*.png"))) == 2


def test_only_the_prompts_of_a_file_count_not_its_comments(tmp_path, tiny_checkpoint):
    path = write_prompt_file(tmp_path / "prompts.txt")
    settings = stage_settings(tmp_path, tiny_checkpoint, f"--prompt_file={path}")
    before = generate.round_parameters(settings, None)
    write_prompt_file(path, "# reworded comments resume the round\n" + PROMPT_FILE.replace("# a note", ""))
    assert generate.round_parameters(settings, None) == before
    write_prompt_file(path, PROMPT_FILE.replace("fog", "smoke"))
    assert generate.round_parameters(settings, None) != before


# ---------------------------------------------------------------- malformed prompt files


MALFORMED = {  # file content -> what the one sentence says
    "unbalanced": (b"a car\na {red|blue car\n", "line 2: the braces"),
    "empty": (b"# only a comment\n\n", "holds no prompt"),
    "not_utf8": (b"a car\nfog\ncaf\xe9\n", "line 3: not UTF-8"),
    "too_long": (b"a car\n# a comment\na {cat|" + b"b" * 80 + b"}\n", "line 3:.*would be truncated"),
}


@pytest.mark.stages
def test_a_malformed_prompt_file_stops_generate_with_one_sentence_naming_it(tmp_path, tiny_checkpoint):
    calls = []
    for name, (content, _) in MALFORMED.items():
        path = write_prompt_file(tmp_path / f"{name}.txt", content)
        calls.append(("generate", [f"--prompt_file={path}", NO_LORA, "--generate_sample_size=1"],
                      {"cwd": tmp_path / name, "checkpoint": tiny_checkpoint}))
        (tmp_path / name).mkdir()
    for (name, (_, message)), result in zip(MALFORMED.items(), run_scripts(calls)):
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        error = result.stderr.strip()
        assert len(error.splitlines()) == 1 and str(tmp_path / f"{name}.txt") in error, error
        assert re.search(message, error), error
        assert not (tmp_path / name / "samples" / "round.json").exists()  # stopped before planning a round


@pytest.mark.parametrize("content, message", [
    ("{a|b}}", "line 1: the braces"),
    ("ok\n{a|{b|c}}", "line 2: the braces"),
    ("}{", "the braces"),
    ("a {} car", "empty variant"),
    ("a {red||blue} car", "empty variant"),
    ("a { |blue} car", "empty variant"),
    ("   \n# x\n  # y", "holds no prompt"),
])
def test_malformed_lines_are_named(tmp_path, content, message):
    path = write_prompt_file(tmp_path / "p.txt", content)
    with pytest.raises(UserError, match=message) as raised:
        read_prompt_file(str(path))
    assert str(path) in str(raised.value)


def test_a_byte_order_mark_and_windows_line_ends_are_fine(tmp_path):
    path = write_prompt_file(tmp_path / "p.txt", "\ufeffa car\r\n# c\r\nfog\r\n".encode("utf-8"))
    assert read_prompt_file(str(path)) == ["a car", "fog"]


def test_the_token_limit_counts_each_lines_longest_variant_with_every_tokenizer(tmp_path, tiny_sdxl_checkpoint):
    tokenizer = tiny_tokenizer(str(tmp_path / "tokenizer"))  # one token per character, plus start and end
    fits = write_prompt_file(tmp_path / "fits.txt", "a " + "b" * 74 + "\n{c|" + "d" * 75 + "}\n")  # 77 tokens
    check_token_lengths(str(fits), [tokenizer])
    over = write_prompt_file(tmp_path / "over.txt", "a car\n{c|" + "d" * 76 + "} e\n")
    with pytest.raises(UserError, match=r"line 2: 'd{76} e' is 79 tokens, more than the 77 .* would be truncated"):
        check_token_lengths(str(over), [tokenizer])
    shorter = tiny_tokenizer(str(tmp_path / "tokenizer_2"))
    shorter.model_max_length = 10
    with pytest.raises(UserError, match="line 1: 'a red car again' is 14 tokens, more than the 10"):  # each counts
        check_token_lengths(str(write_prompt_file(tmp_path / "p.txt", "a red car again\n")), [tokenizer, shorter])
    assert len(text_tokenizers(load_pipeline(tiny_sdxl_checkpoint, "cpu", torch.float32))) == 2  # SDXL's both


# ---------------------------------------------------------------- the ranking loss pairs within a prompt


def test_ranking_loss_pairs_scores_within_a_group_only():
    predicted = torch.tensor([1.0, 0.0, 0.5, 2.0])
    scores = torch.tensor([3.0, 1.0, 2.0, -1.0])
    groups = torch.tensor([0, 0, 1, 1])
    # within group 0: image 0 beats 1, margin 1; within group 1: image 2 beats 3, margin -1.5
    expected = (torch.nn.functional.softplus(torch.tensor(-1.0)) + torch.nn.functional.softplus(torch.tensor(1.5))) / 2
    assert score_ranking_loss(predicted, scores, groups).item() == pytest.approx(expected.item(), abs=1e-6)
    assert score_ranking_loss(predicted, scores).item() != pytest.approx(expected.item(), abs=1e-3)  # across, too
    one_group = torch.zeros(4, dtype=torch.long)
    assert score_ranking_loss(predicted, scores, one_group).item() == score_ranking_loss(predicted, scores).item()
    assert score_ranking_loss(predicted, torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.arange(4)).item() == 0.0
    # MSE compares each score with its own prediction: groups do not enter it
    assert score_loss("mse", predicted, scores, groups).item() == score_loss("mse", predicted, scores).item()
    empty = torch.zeros(0, 2), torch.zeros(0)
    assert objective("ranking", predicted, scores, *empty, groups).item() == pytest.approx(expected.item(), abs=1e-6)


def test_ratings_carry_their_groups_through_split_and_device():
    ratings = Ratings.of_scores(torch.zeros(4, 4, 8, 8), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert ratings.groups.tolist() == [0, 0, 0, 0]  # no groups given: one, as before prompt sets
    grouped = Ratings(ratings.latents, ratings.scored, ratings.scores, ratings.pairs, ratings.outcomes,
                      torch.tensor([0, 1, 0, 1]))
    part = grouped.subset(torch.tensor([3, 0]), torch.zeros(0, dtype=torch.long)).to("cpu")
    assert part.groups.tolist() == [1, 0] and part.scores.tolist() == [4.0, 1.0]


def rated_round(samples, seeds, round_file):
    """A rated round on disk as generate and score leave it (random latents; PNGs only mark the images)."""
    samples.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seeds[0])
    for seed in seeds:
        Image.new("RGB", (64, 64)).save(samples / f"{seed}.png")
        save_latent(latent_file(str(samples), f"{seed}.png"), torch.randn(4, 8, 8, generator=generator))
    (samples / "round.json").write_text(json.dumps({"seeds": seeds, **round_file}))
    (samples / "scores.json").write_text(json.dumps({f"{seed}.png": seed - 3 for seed in seeds}))  # one per seed


def test_train_reward_groups_scores_by_their_prompt_across_rounds(tmp_path):
    samples = tmp_path / "samples"
    rated_round(samples / "history" / "round_001", [1, 2], {"parameters": {"prompt": "a cat"}})
    rated_round(samples, [3, 4, 5], {"parameters": {"prompt_lines": ["a {cat|dog}"]},
                                     "prompts": {"3": "a dog", "4": "a cat", "5": "a dog"}})
    settings = parse_settings([f"--sample_path={samples}/", "--device=cpu"], train_reward.USED_SETTINGS)
    _, ratings = train_reward.load_ratings(settings, "cpu")
    group_of_seed = {int(score) + 3: group for score, group in zip(ratings.scores.tolist(), ratings.groups.tolist())}
    cat, dog = group_of_seed[4], group_of_seed[3]
    assert cat != dog and group_of_seed[1] == group_of_seed[2] == cat and group_of_seed[5] == dog


def test_train_reward_keeps_one_group_for_rounds_of_one_prompt(tmp_path):
    samples = tmp_path / "samples"
    rated_round(samples / "history" / "round_001", [1, 2], {"parameters": {"prompt": "a neon sign"}})
    rated_round(samples, [3, 4], {"parameters": {"prompt": "a neon sign"}})
    settings = parse_settings([f"--sample_path={samples}/", "--device=cpu"], train_reward.USED_SETTINGS)
    assert train_reward.load_ratings(settings, "cpu")[1].groups.tolist() == [0, 0, 0, 0]
