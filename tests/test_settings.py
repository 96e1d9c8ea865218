"""Settings: a --name=value override is typed by its default, the last one wins, --help lists what a stage
reads, and every bad value (a typo, a wrong type, out of range, contradictory) is one sentence naming the
setting, refused before any model loads. tests/test_bad_input.py runs one through a real script."""

import importlib
import re

import pytest

import config
from conftest import REPO
from utils.cli import SettingsError, defaults, parse_settings

# arguments: the words the one sentence must hold
BAD_SETTINGS = [
    # names and types
    (["--lora_rnak=8"], ["--lora_rank"]),
    (["--train_policy_epochs=3"], ["--train_policy_num_epochs"]),
    (["--zzzz=1"], ["--help"]),
    (["--eta=high"], ["--eta", "'high'", "number"]),
    (["--generate_vae_slicing=maybe"], ["--generate_vae_slicing", "True or False"]),
    (["height=64"], ["--name=value", "'height=64'"]),
    (["--height=abc"], ["--height", "'abc'", "whole number"]),
    (["--mixed_precision=fp8"], ["mixed_precision", "fp16, bf16 or no"]),
    # not finite
    (["--eta=nan"], ["--eta", "finite"]),
    (["--eta=inf"], ["--eta", "finite"]),
    (["--train_policy_learning_rate=inf"], ["--train_policy_learning_rate", "finite"]),
    (["--train_reward_learning_rate=-inf"], ["--train_reward_learning_rate", "finite"]),
    (["--guidance_scale=NaN"], ["--guidance_scale", "finite"]),
    (["--train_clip_range=nan"], ["--train_clip_range", "finite"]),
    # out of range
    (["--eta=-0.5"], ["eta", "> 0"]),
    (["--width=36"], ["width", "multiple of 8", "36"]),
    (["--height=0"], ["height", "multiple of 8"]),
    (["--height=56"], ["height", "at least 64", "56"]),
    (["--width=8"], ["width", "at least 64"]),
    (["--num_inference_steps=1001"], ["num_inference_steps", "at most 1000", "1001"]),
    (["--train_reward_num_epochs=0"], ["train_reward_num_epochs", "at least 1"]),
    (["--seed=-1"], ["seed", "0 or more", "-1"]),
    (["--train_preview_seeds=a,b"], ["train_preview_seeds", "whole numbers", "'a,b'"]),
    (["--train_preview_seeds=1.5"], ["train_preview_seeds", "whole numbers"]),
    (["--train_preview_seeds=-3"], ["train_preview_seeds", "0 or more"]),
    # paths that contradict each other
    (["--score_path=/tmp/elsewhere/scores.json"], ["score_path", "/tmp/elsewhere/scores.json", "sample_path",
                                                   "history"]),
    (["--sample_path=a/", "--score_path=a/sub/scores.json"], ["score_path", "directly in sample_path"]),
    # batch arithmetic that does not divide
    (["--train_sample_batch_size=4", "--train_sample_num_batches_per_epoch=3", "--train_policy_batch_size=5"],
     ["12 images per epoch", "train_policy_batch_size = 5"]),
    (["--train_sample_batch_size=4", "--train_sample_num_batches_per_epoch=3", "--train_optimizer_steps_per_epoch=5"],
     ["train_optimizer_steps_per_epoch = 5", "12 minibatches"]),
]


@pytest.mark.parametrize("arguments, words", BAD_SETTINGS)
def test_every_bad_setting_is_one_sentence_naming_it(arguments, words):
    with pytest.raises(SettingsError) as refusal:
        parse_settings(["--device=cpu", *arguments])
    message = str(refusal.value)
    assert "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_settings_in_range_pass():
    settings = parse_settings(["--device=cpu", "--num_inference_steps=1000", "--height=64", "--seed=0",
                               "--train_preview_seeds=", "--sample_path=x/", "--score_path=x/my_scores.json"])
    assert settings.num_inference_steps == 1000 and settings.score_path == "x/my_scores.json"


def test_settings_parse_types_and_the_last_value_wins():
    settings = parse_settings(["--device=cpu", "--height=64", "--height=128", "--eta=0.5",
                               "--generate_vae_slicing=false", "--prompt=a cat, at night"])
    assert (settings.height, settings.eta, settings.generate_vae_slicing) == (128, 0.5, False)
    assert settings.prompt == "a cat, at night"
    assert settings.width == config.width  # untouched settings keep config.py's value


def test_help_lists_the_stages_settings_with_their_values(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_settings(["--device=cpu", "--height=64", "--help"], ["generate_lora", "height"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--generate_lora=latest" in out and "--height=64" in out
    assert "--train_clip_range" not in out


@pytest.mark.parametrize("stage", ["generate", "score", "train_reward", "train_policy"])
def test_help_lists_every_setting_the_stage_reads(stage):
    """--help prints USED_SETTINGS: each stage's list must hold every `settings.<name>` its script reads."""
    source = (REPO / f"{stage}.py").read_text()
    read = set(re.findall(r"\bsettings\.([a-z_]+)", source)) & set(defaults())
    listed = set(importlib.import_module(stage).USED_SETTINGS)
    assert read <= listed, f"{stage}.USED_SETTINGS lacks {sorted(read - listed)}"
    assert listed <= set(defaults())


def test_every_setting_of_config_py_has_exactly_one_type():
    """config.py's own values are type-checked from these tables: a setting missing from them goes unchecked."""
    from utils.cli import BOOL_OR_AUTO, BOOLEANS, INTEGERS, NUMBERS, TEXTS, defaults
    tables = [INTEGERS, NUMBERS, BOOLEANS, BOOL_OR_AUTO, TEXTS]
    assert all(sum(name in table for table in tables) == 1 for name in defaults()), \
        [name for name in defaults() if sum(name in table for table in tables) != 1]
    assert set().union(*tables) == set(defaults())
