"""The guards against reward hacking (docs/policy.md): their maths against hand computations, upstream's
weights with both off, and the next round's check of the last LoRA end to end."""

import contextlib
import copy
import io
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_ddpo_reference import ADV_CLIP_MAX, CLIP_RANGE, OPTIMIZERS, SHUFFLE_SEED, lora_weights, reference

from conftest import REPO, TINY_SETTINGS, tiny_denoiser
from ddpo.kl import KLToBase, adapters_disabled, gaussian_kl, measured_steps, step_kl_to_base, trajectory_kl_to_base
from ddpo.ppo import compute_advantages, policy_gradient_backward
from ddpo.precision import MixedPrecision
from ddpo.reward_model import LatentRewardModel, RewardEnsemble, pessimistic_reward
from ddpo.sampling import guided_noise_pred, sample_with_logprob
from train_policy import sample_epoch, train_epoch, training_minibatches
from utils.cli import SettingsError, parse_settings, stage_paths

STEPS, ETA = 3, 1.0


@pytest.fixture(scope="module")
def denoiser():
    """The tiny UNet with a random (not zero) LoRA, so the LoRA and the base model differ."""
    return tiny_denoiser(5.0, ETA)


@pytest.fixture(scope="module")
def record(denoiser):
    return sample_with_logprob(denoiser, [torch.Generator().manual_seed(s) for s in range(4)], 64, 64, STEPS)


def hand_ddim_mean(scheduler, noise_pred, t, latents):
    """DDIM's mean and std for one timestep, written out from the paper (eq. 12 and 16), eta = ETA."""
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[t]
    a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    x0 = (latents - (1 - a_t) ** 0.5 * noise_pred) / a_t ** 0.5
    std = ETA * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    return a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * noise_pred, std


# ---------------------------------------------------------------- KL to the base model

def test_gaussian_kl_is_the_squared_mean_difference_over_twice_the_variance_averaged_over_dimensions():
    mean_policy = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    mean_base = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    std = torch.tensor([[2.0], [1.0]])
    # (1/8 + 4/8) / 2 and (9/2 + 0) / 2
    torch.testing.assert_close(gaussian_kl(mean_policy, mean_base, std), torch.tensor([5 / 16, 9 / 4]))


def test_the_step_kl_is_that_of_the_two_models_ddim_gaussians_and_the_mean_of_the_log_prob_difference(denoiser, record):
    j = 1
    latents, t = record["latents"][:, j], record["timesteps"][j]
    timesteps = t.reshape(1).expand(len(latents))
    with torch.no_grad():
        lora_pred = guided_noise_pred(denoiser, latents, timesteps)
        with adapters_disabled(denoiser.unet):
            base_pred = guided_noise_pred(denoiser, latents, timesteps)
        kl = step_kl_to_base(denoiser, denoiser, lora_pred, latents, timesteps)
    mean_lora, std = hand_ddim_mean(denoiser.scheduler, lora_pred, int(t), latents)
    mean_base, _ = hand_ddim_mean(denoiser.scheduler, base_pred, int(t), latents)
    by_hand = ((mean_lora - mean_base) ** 2 / (2 * std ** 2)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kl, by_hand, rtol=1e-4, atol=1e-9)
    assert (kl > 1e-6).all(), "the random LoRA must move the step for this to mean anything"
    # the same in expectation as log p_lora(x) - log p_base(x) at x drawn from the LoRA's step
    generator = torch.Generator().manual_seed(0)
    draws = [mean_lora + std * torch.randn(mean_lora.shape, generator=generator) for _ in range(400)]

    def log_density(x, mean):
        return (-((x - mean) ** 2) / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))

    differences = torch.stack([log_density(x, mean_lora) - log_density(x, mean_base) for x in draws])  # (draws, n)
    standard_error = differences.std(0) / len(draws) ** 0.5
    assert ((differences.mean(0) - kl).abs() < 4 * standard_error).all()
    assert (standard_error < 0.2 * kl).all(), "enough draws for the comparison to mean anything"


def test_the_kl_along_a_trajectory_is_its_steps_mean_and_zero_for_the_base_model(denoiser, record):
    per_step = []
    for j, t in enumerate(record["timesteps"]):
        latents = record["latents"][:, j]
        timesteps = t.reshape(1).expand(len(latents))
        with torch.no_grad():
            per_step.append(step_kl_to_base(denoiser, denoiser, guided_noise_pred(denoiser, latents, timesteps),
                                            latents, timesteps))
    torch.testing.assert_close(trajectory_kl_to_base(denoiser, record), torch.stack(per_step, 1).mean(1))
    with adapters_disabled(denoiser.unet):
        with torch.no_grad():
            latents = record["latents"][:, 0]
            timesteps = record["timesteps"][0].reshape(1).expand(len(latents))
            base_pred = guided_noise_pred(denoiser, latents, timesteps)
    assert step_kl_to_base(denoiser, denoiser, base_pred, latents, timesteps).abs().max() == 0


def minibatch_of(record, advantages):
    n = len(record["latents"])
    return {"latents": record["latents"][:, :-1], "next_latents": record["latents"][:, 1:],
            "log_probs": record["log_probs"], "timesteps": record["timesteps"].expand(n, -1), "advantages": advantages}


def lora_gradient(unet):
    return torch.cat([p.grad.flatten() for p in unet.parameters() if p.requires_grad])


def test_the_kl_penalty_adds_weight_times_each_steps_kl_with_its_gradient(denoiser, record):
    weight = 0.7
    trainer = copy.deepcopy(denoiser)
    trainer.unet.zero_grad(set_to_none=True)
    n = len(record["latents"])
    # advantages 0: the PPO term has no gradient, so what is left is the penalty's
    stats = policy_gradient_backward(trainer, minibatch_of(record, torch.zeros(n)), CLIP_RANGE, 2,
                                     kl=KLToBase(trainer, weight))
    ours = lora_gradient(trainer.unet)
    trainer.unet.zero_grad(set_to_none=True)
    # by hand: upstream's loss is a mean over images summed over timesteps, so the penalty is too
    total, logged = 0.0, 0.0
    for j, t in enumerate(record["timesteps"]):
        latents = record["latents"][:, j]
        lora_pred = guided_noise_pred(trainer, latents, t.reshape(1).expand(n))
        with torch.no_grad(), adapters_disabled(trainer.unet):
            base_pred = guided_noise_pred(trainer, latents, t.reshape(1).expand(n))
        mean_lora, std = hand_ddim_mean(trainer.scheduler, lora_pred, int(t), latents)
        mean_base, _ = hand_ddim_mean(trainer.scheduler, base_pred, int(t), latents)
        kl = ((mean_lora - mean_base) ** 2 / (2 * std ** 2)).mean()
        total = total + weight * kl
        logged += kl.item() / STEPS
    total.backward()
    by_hand = lora_gradient(trainer.unet)
    assert by_hand.abs().max() > 0
    torch.testing.assert_close(ours, by_hand, rtol=1e-3, atol=1e-3 * by_hand.abs().max().item())
    assert stats["kl_to_base"] == pytest.approx(logged, rel=1e-4)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_with_both_guards_at_zero_an_epoch_still_gives_the_seeds_lora_weights(denoiser, optimizer_name):
    """As tests/test_ddpo_reference.py, with the KL measured (base given) and its weight 0."""
    from test_ddpo_reference import IMAGES
    from test_ddpo_reference import STEPS as REFERENCE_STEPS

    reference_denoiser = tiny_denoiser(5.0, 1.0)
    samples = sample_with_logprob(reference_denoiser, [torch.Generator().manual_seed(s) for s in range(IMAGES)], 64,
                                  64, REFERENCE_STEPS)
    samples["timesteps"] = samples["timesteps"].expand(IMAGES, -1)
    rewards = torch.randn(IMAGES, generator=torch.Generator().manual_seed(1)) * 3
    expected = reference(reference_denoiser, samples, rewards, optimizer_name, 1, 1)
    trainer = copy.deepcopy(reference_denoiser)
    optimizer = OPTIMIZERS[optimizer_name]([p for p in trainer.unet.parameters() if p.requires_grad])
    minibatches = training_minibatches(samples, compute_advantages(rewards, ADV_CLIP_MAX), 1, 1.0,
                                       torch.Generator().manual_seed(SHUFFLE_SEED))
    stats = train_epoch(trainer, optimizer, minibatches, CLIP_RANGE, 1, 1, MixedPrecision.create("no", "cpu"),
                        kl=KLToBase(trainer, 0.0))
    actual = lora_weights(trainer.unet)
    update = (expected - lora_weights(reference_denoiser.unet)).abs().max().item()
    tolerance = update * (1e-3 if optimizer_name == "sgd" else 0.2)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=tolerance)
    assert stats["kl_to_base"] > 0  # measured all the same


@pytest.mark.parametrize("images,steps,fraction", [(4, 3, 0.25), (32, 10, 0.25), (1, 5, 0.25), (5, 7, 1.0),
                                                    (3, 2, 0.01), (10, 2, 0.5)])
def test_the_measured_steps_are_every_step_of_an_evenly_spaced_fraction_of_images_weighted_to_a_mean_of_one(
        images, steps, fraction):
    weights = measured_steps(images, steps, fraction)
    assert weights.shape == (images, steps)
    measured = (weights > 0).all(1).nonzero()[:, 0]
    assert ((weights > 0).any(1) == (weights > 0).all(1)).all(), "an image is measured at all its steps or none"
    assert len(measured) == max(1, round(fraction * images))
    assert weights.mean().item() == pytest.approx(1.0)
    assert set(weights.flatten().tolist()) <= {0.0, images / len(measured)}
    if len(measured) > 2:  # evenly spaced: the gaps differ by at most one
        gaps = measured.diff()
        assert gaps.max() - gaps.min() <= 1


def test_a_penalty_on_measured_steps_is_weight_times_their_kl_scaled_to_every_steps_share(denoiser, record):
    """Measured on 1 of the 4 images, its 3 steps: the penalty is weight x 4 x their KL / 4 images (an unbiased
    estimate of the mean over all 4), and the logged KL is their mean."""
    weight, n = 0.7, len(record["latents"])
    minibatch = minibatch_of(record, torch.zeros(n))
    minibatch["kl_measured"] = measured_steps(n, STEPS, 0.25)  # (4, 3)
    trainer = copy.deepcopy(denoiser)
    trainer.unet.zero_grad(set_to_none=True)
    stats = policy_gradient_backward(trainer, minibatch, CLIP_RANGE, 2, kl=KLToBase(trainer, weight))
    ours = lora_gradient(trainer.unet)
    trainer.unet.zero_grad(set_to_none=True)
    total, kls = 0.0, []
    for i, j in minibatch["kl_measured"].nonzero().tolist():  # image i at its j-th timestep
        latents, t = record["latents"][i:i + 1, j], record["timesteps"][j]
        lora_pred = guided_noise_pred(trainer, latents, t.reshape(1))
        with torch.no_grad(), adapters_disabled(trainer.unet):
            base_pred = guided_noise_pred(trainer, latents, t.reshape(1))
        mean_lora, std = hand_ddim_mean(trainer.scheduler, lora_pred, int(t), latents)
        mean_base, _ = hand_ddim_mean(trainer.scheduler, base_pred, int(t), latents)
        kl = ((mean_lora - mean_base) ** 2 / (2 * std ** 2)).mean()
        total = total + weight * 4 * kl / n  # upstream's sum over timesteps of a mean over images
        kls.append(kl.item())
    assert len(kls) == 3
    total.backward()
    by_hand = lora_gradient(trainer.unet)
    assert by_hand.abs().max() > 0
    torch.testing.assert_close(ours, by_hand, rtol=1e-3, atol=1e-3 * by_hand.abs().max().item())
    assert stats["kl_to_base"] == pytest.approx(sum(kls) / 3, rel=1e-4) and stats["kl_measured_steps"] == 3


@contextlib.contextmanager
def counting_unet_rows(unet):
    """A list that gets the batch size of every UNet call inside the block."""
    rows = []
    handle = unet.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    try:
        yield rows
    finally:
        handle.remove()


@pytest.mark.parametrize("fraction", [1.0, 0.25, 0.0])
def test_the_kl_fraction_is_the_share_of_extra_unet_rows_an_epoch_costs(denoiser, record, fraction):
    """The cost of measuring the KL, counted: the base model runs on `fraction` of the trained rows."""
    n = len(record["latents"])
    samples = {**record, "timesteps": record["timesteps"].expand(n, -1)}
    minibatches = training_minibatches(samples, torch.randn(n, generator=torch.Generator().manual_seed(0)), 2, 1.0,
                                       torch.Generator().manual_seed(0), fraction)
    trainer = copy.deepcopy(denoiser)
    optimizer = torch.optim.SGD([p for p in trainer.unet.parameters() if p.requires_grad], lr=0.0)
    with counting_unet_rows(trainer.unet) as rows:
        stats = train_epoch(trainer, optimizer, minibatches, CLIP_RANGE, 1, 1, MixedPrecision.create("no", "cpu"),
                            kl=KLToBase(trainer) if fraction else None)
    trained = 2 * n * STEPS  # classifier-free guidance: two rows per (image, timestep)
    assert sum(rows) == trained + round(fraction * trained)
    assert ("kl_to_base" in stats) == bool(fraction)


@pytest.mark.parametrize("arguments,match", [
    (["--train_kl_fraction=1.5"], "train_kl_fraction must be in"),
    (["--train_kl_fraction=-0.1"], "train_kl_fraction must be in"),
    (["--train_kl_weight=0.1", "--train_kl_fraction=0"], "does not measure"),
])
def test_a_kl_fraction_out_of_range_or_none_under_a_penalty_is_refused(arguments, match):
    with pytest.raises(SettingsError, match=match):
        parse_settings(arguments)


# ---------------------------------------------------------------- pessimism

def test_the_pessimistic_reward_is_the_mean_less_k_population_stds_over_the_members():
    scores = torch.tensor([[1.0, 2.0, 5.0], [3.0, 6.0, 5.0]])  # (members, batch)
    torch.testing.assert_close(pessimistic_reward(scores, 0.0), torch.tensor([2.0, 4.0, 5.0]))
    torch.testing.assert_close(pessimistic_reward(scores, 1.5), torch.tensor([2.0 - 1.5, 4.0 - 3.0, 5.0]))
    single = torch.tensor([[0.3, -0.2]])
    torch.testing.assert_close(pessimistic_reward(single, 2.0), single[0])  # one CNN: its own score, as upstream's


def test_the_epochs_rewards_are_the_plain_mean_at_pessimism_zero_and_lower_where_the_cnns_disagree(denoiser):
    torch.manual_seed(0)
    ensemble = RewardEnsemble([LatentRewardModel() for _ in range(3)]).eval()
    plain = sample_epoch(denoiser, ensemble, [0, 1], {}, 2, 64, 64, 2, False)  # {}: the denoiser's one prompt
    careful = sample_epoch(denoiser, ensemble, [0, 1], {}, 2, 64, 64, 2, False, pessimism=2.0)
    final = plain["latents"][:, -1]
    with torch.no_grad():
        torch.testing.assert_close(plain["rewards"], ensemble(final))
        members = ensemble.member_scores(final)
    torch.testing.assert_close(careful["rewards"], members.mean(0) - 2.0 * members.std(0, correction=0))
    torch.testing.assert_close(careful["member_spreads"], members.std(0, correction=0))


@pytest.mark.parametrize("name", ["train_kl_weight", "train_reward_pessimism"])
def test_a_negative_guard_is_refused_with_its_name(name):
    with pytest.raises(SettingsError, match=name):
        parse_settings([f"--{name}=-1"])


# ---------------------------------------------------------------- the next round checks the last, end to end

ROUND_IMAGES = 32


def stage(module, folder, checkpoint, **overrides):
    """Run a stage's main() in-process with every path in `folder` and the tiny settings."""
    values = {**stage_paths(str(folder), checkpoint), **TINY_SETTINGS, **overrides}
    settings = parse_settings([f"--{k}={v}" for k, v in values.items()], module.USED_SETTINGS)
    module.main(settings)


def rate_by_brightness(folder, calibration=None):
    from tools.scripted_rater import brightness_values, calibration_of, scores_from_values
    from utils.files import write_json_atomic

    values = brightness_values(str(folder / "samples"))
    calibration = calibration or calibration_of(values)
    write_json_atomic(str(folder / "samples" / "scores.json"), scores_from_values(values, calibration))
    return calibration


REWARD = {"train_reward_num_epochs": 20, "train_reward_batch_size": 8, "train_reward_loss": "ranking",
          "train_reward_test_split_ratio": 0.25, "seed": 0}
POLICY = {"train_sample_batch_size": 8, "train_sample_num_batches_per_epoch": 2, "train_policy_batch_size": 16,
          "train_policy_learning_rate": 1e-2, "train_policy_num_epochs": 2, "train_save_freq": 1,
          "train_preview_seeds": ""}


@pytest.fixture(scope="module")
def next_rounds(tmp_path_factory, tiny_checkpoint):
    """{"good", "wrong"}: train_reward's output and reward metrics on the second round, made with a LoRA trained
    against a reward model of the person's taste (brightness) or of its opposite; the person rates brightness.
    {"policy_good", "policy_wrong"}: train_policy's output, metrics records and plot."""
    import generate
    import train_policy
    import train_reward

    torch.set_num_threads(1)
    first = tmp_path_factory.mktemp("first_round")
    stage(generate, first, tiny_checkpoint, generate_sample_size=ROUND_IMAGES, generate_batch_size=16,
          generate_lora="none")
    calibration = rate_by_brightness(first)
    outcome = {}
    for kind in ("good", "wrong"):
        folder = tmp_path_factory.mktemp(kind)
        shutil.copytree(first / "samples", folder / "samples")  # the same rated first round for both
        if kind == "wrong":  # the model learns the opposite of the person's ratings
            scores_file = folder / "samples" / "scores.json"
            scores_file.write_text(json.dumps({k: -v for k, v in json.loads(scores_file.read_text()).items()}))
        stage(train_reward, folder, tiny_checkpoint, **REWARD)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            stage(train_policy, folder, tiny_checkpoint, **POLICY)
        with open(folder / "outputs" / "policy_metrics.jsonl") as f:
            outcome[f"policy_{kind}"] = (printed.getvalue(), [json.loads(line) for line in f],
                                         folder / "outputs" / "policy_metrics.png")
        stage(generate, folder, tiny_checkpoint, generate_sample_size=ROUND_IMAGES, generate_batch_size=16)
        rate_by_brightness(folder, calibration)  # the person: brightness, as always
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            stage(train_reward, folder, tiny_checkpoint, **REWARD)
        with open(folder / "models" / "reward_metrics.jsonl") as f:
            checks = [r for r in map(json.loads, f) if "check" in r]
        outcome[kind] = (printed.getvalue(), checks)
    return outcome


def test_a_lora_trained_against_a_wrong_reward_model_is_flagged_by_the_next_rounds_ratings(next_rounds):
    stdout, checks = next_rounds["wrong"]
    assert len(checks) == 1 and checks[0]["lora"] == "diffusers_lora_epoch_2.safetensors"
    assert checks[0]["blind_spots_found"] and checks[0]["spearman"] < 0
    assert "found the reward model's blind spots" in stdout and "consider an earlier lora" in stdout.lower()


def test_a_lora_trained_against_a_good_reward_model_is_not_flagged(next_rounds):
    stdout, checks = next_rounds["good"]
    assert len(checks) == 1 and checks[0]["ratings"] == ROUND_IMAGES
    assert not checks[0]["blind_spots_found"] and checks[0]["spearman"] > 0.5
    assert "Spearman" in stdout and "blind spots" not in stdout


def test_train_policy_logs_each_epochs_kl_to_the_base_model_and_says_on_what_share(next_rounds):
    stdout, records, plot = next_rounds["policy_good"]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["kl_to_base"] == 0  # epoch 1 trains at the new LoRA, which is the base model (B = 0)
    assert records[1]["kl_to_base"] > 1e-6  # after one AdamW step at lr 1e-2 it is not
    assert "KL to the base model logged every epoch, measured on 25% of the epoch's images" in stdout
    assert "KL to base" in stdout.split("epoch 2: reward")[1].splitlines()[0]
    assert plot.stat().st_size > 0


# ---------------------------------------------------------------- the instrument runs

def test_benchmark_policy_runs_on_its_tiniest_setting_and_writes_its_report(tmp_path):
    out = tmp_path / "policy.json"
    result = subprocess.run(
        [sys.executable, "-m", "tools.benchmark_policy", "--tastes=warmth", "--methods=upstream,pessimism",
         "--seeds=1", "--epochs=1", "--save_every=1", "--ratings=16", "--eval_images=4", "--steps=2", "--jobs=1",
         f"--out={out}", f"--work={tmp_path / 'runs'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    row = report["results"]["warmth"]["methods"]["upstream"]
    assert row["epochs"] == [0, 1] and len(row["true_gain"]) == 2 and row["true_gain"][0] == 0
    assert row["kl"][1] > 0 and len(row["opposite_change"]) == 2
    assert (tmp_path / "policy.png").stat().st_size > 0
