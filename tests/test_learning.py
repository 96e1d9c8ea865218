"""The point of the project as a test: a rater's taste, learned by the reward model from the ratings,
makes the policy's fresh samples score higher with that rater.

It is demo.py's loop exactly (its settings, its scripted rater that likes bright images, two rounds of
the real stage scripts), run in a temporary folder.
"""

import json
import os

import pytest
from PIL import Image

import config
import demo
from generate import read_round
from tools.scripted_rater import calibration_of, scores_from_values
from utils.cli import images_per_epoch, parse_settings


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "demo"
    with pytest.MonkeyPatch.context() as patch:  # one thread per stage process, as conftest.run_script gives
        patch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
        return folder, demo.run_demo(str(folder), extra_args=["--device=cpu"])


@pytest.mark.stages
@pytest.mark.slow
def test_fresh_samples_score_higher_after_two_rounds_by_half_a_standard_deviation(demo_run):
    _, summary = demo_run
    first, last = summary["rounds"][0], summary["rounds"][-1]
    assert [r["lora_epochs"] for r in summary["rounds"]] == [0, demo.POLICY_EPOCHS_PER_ROUND,
                                                             2 * demo.POLICY_EPOCHS_PER_ROUND]
    assert last["score_mean"] - first["score_mean"] >= demo.REQUIRED_RISE * first["score_std"], summary["rounds"]
    assert summary["learned"]
    # with half the ratings the demo used before the reward ensemble (all 96 images of each round)
    assert summary["ratings_used"] <= demo.ROUNDS * demo.DEMO_SETTINGS["generate_sample_size"] // 2


@pytest.mark.stages
@pytest.mark.slow
def test_the_measured_seeds_are_fresh_and_the_reward_models_learned_the_rule(demo_run):
    folder, summary = demo_run
    assert all(r["seeds_trained_on"] == 0 and r["images"] == demo.DEMO_SETTINGS["generate_sample_size"]
               for r in summary["rounds"])
    # "no overlap" means something only against every seed the policy sampled, and every measured one
    settings = parse_settings([f"--{k}={v}" for k, v in demo.demo_settings(str(folder)).items()] + ["--device=cpu"])
    epochs = demo.ROUNDS * demo.POLICY_EPOCHS_PER_ROUND
    trained_on = demo.policy_seeds(settings, epochs)
    assert len(trained_on) == epochs * images_per_epoch(settings)
    measured = [read_round(str(path))["seeds"] for path in sorted(folder.glob("samples/**/round.json"))]
    assert len(measured) == demo.ROUNDS + 1 and all(len(seeds) == settings.generate_sample_size for seeds in measured)
    assert not trained_on & {seed for seeds in measured for seed in seeds}
    assert all(r["reward_model_test_pearson"] > config.train_reward_min_correlation for r in summary["rounds"][:-1])


@pytest.mark.stages
@pytest.mark.slow
def test_the_plots_and_previews_a_person_looks_at_are_pngs(demo_run):
    folder, summary = demo_run
    last_epoch = demo.ROUNDS * demo.POLICY_EPOCHS_PER_ROUND
    seeds = len(demo.DEMO_SETTINGS["train_preview_seeds"].split(","))
    expected = {"models/reward_metrics.png": (1000, 360), "outputs/policy_metrics.png": (1500, 720),
                f"outputs/preview_epoch_{last_epoch}.png": (seeds * 128, 2 * (128 + 34))}
    for name, size in expected.items():
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.size == size, name
    with open(folder / "summary.json") as f:
        assert json.load(f)["learned"] == summary["learned"]
    assert os.path.isfile(folder / "rater_calibration.json")


def test_the_rater_gives_a_brightness_the_same_score_in_every_round():
    first_round = {"a.png": 100.0, "b.png": 120.0, "c.png": 140.0}
    calibration = calibration_of(first_round)
    assert scores_from_values(first_round, calibration) == {"a.png": -2, "b.png": 0, "c.png": 2}
    brighter_round = {"d.png": 120.0, "e.png": 140.0, "f.png": 160.0}
    assert scores_from_values(brighter_round, calibration) == {"d.png": 0, "e.png": 2, "f.png": 5}
    assert scores_from_values(brighter_round) == {"d.png": -2, "e.png": 0, "f.png": 2}  # per-round: no rise seen


def test_the_demo_clears_only_a_folder_of_its_own(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "ratings.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a demo folder"):
        demo.prepare_folder(str(theirs))
    assert (theirs / "ratings.json").is_file()
    ours = tmp_path / "ours"
    record_made = demo.prepare_folder(str(ours))
    (ours / "old.png").write_bytes(b"")
    record_made()  # as the demo lists what its stages wrote
    demo.prepare_folder(str(ours))
    assert os.listdir(ours) == [demo.MARKER]
