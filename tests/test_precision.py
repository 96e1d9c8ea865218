"""The training step in every mixed precision, on CPU: frozen weights in the half dtype, the LoRA in fp32,
autocast, and fp16's grad scaler, exactly the code a GPU runs (only the device type differs). A step
whose loss or gradients are not finite is skipped and counted, and a run of them stops the run."""

import math

import pytest
import torch

from conftest import run_script, tiny_denoiser
from ddpo.lora import add_lora
from ddpo.precision import MIN_LOSS_SCALE, MixedPrecision
from ddpo.sampling import sample_with_logprob
from tools.tiny_checkpoint import tiny_unet
from train_policy import SKIPPED_STEPS_TO_STOP, count_skipped_steps, train_epoch, training_minibatches
from utils.errors import UserError
from utils.lora_files import save_lora
from utils.metrics import read_jsonl


def lora_parameters(unet):
    return [p for p in unet.parameters() if p.requires_grad]


def policy(name):
    """(Denoiser in precision `name`, its MixedPrecision, minibatches of 2 sampled images)."""
    precision = MixedPrecision.create(name, "cpu")
    denoiser = tiny_denoiser(5.0, 1.0, precision.weights_dtype, precision.autocast)
    samples = sample_with_logprob(denoiser, [torch.Generator().manual_seed(s) for s in (3, 4)], 64, 64, 2)
    samples["timesteps"] = samples["timesteps"].expand(2, -1)
    minibatches = training_minibatches(samples, torch.tensor([1.0, -1.0]), 1, 1.0, torch.Generator().manual_seed(0))
    return denoiser, precision, minibatches


def one_step(denoiser, precision, minibatches):
    """train_epoch with one AdamW step; returns (outcomes, LoRA before, LoRA after)."""
    parameters = lora_parameters(denoiser.unet)
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    before = torch.cat([p.detach().flatten().clone() for p in parameters])
    stats = train_epoch(denoiser, optimizer, minibatches, 1e-4, 2, 1, precision)
    return stats["steps"], before, torch.cat([p.detach().flatten() for p in parameters])


def same_direction(update, reference):
    """Share of the weights that `reference` moved which `update` moved the same way.

    Adam's first step is about lr x sign(gradient), so this compares the gradients' directions.
    """
    moved = reference.abs() > 1e-6
    return (update[moved].sign() == reference[moved].sign()).double().mean().item()


@pytest.fixture(scope="module")
def fp32_update():
    _, before, after = one_step(*policy("no"))
    return after - before


@pytest.mark.parametrize("name, half", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_a_half_precision_step_trains_the_fp32_lora_as_fp32_does(name, half, fp32_update):
    denoiser, precision, minibatches = policy(name)
    outputs = []
    hook = denoiser.unet.conv_in.register_forward_hook(lambda module, args, output: outputs.append(output.dtype))
    outcomes, before, after = one_step(denoiser, precision, minibatches)
    hook.remove()
    assert outcomes == ["ok"]
    assert set(outputs) == {half}, "autocast runs the UNet in the half dtype"
    assert all(p.dtype == torch.float32 for p in lora_parameters(denoiser.unet))
    assert denoiser.unet.conv_in.weight.dtype == half  # the frozen weights stay half
    if name == "fp16":  # from GradScaler's 2^16, halved at each overflow until the minibatch's gradient was finite
        assert math.log2(precision.loss_scale).is_integer() and MIN_LOSS_SCALE <= precision.loss_scale <= 2.0**16
        assert precision.clean_minibatches >= 1
    else:  # bf16 has fp32's range: nothing to scale
        assert precision.loss_scale == 1.0 and precision.clean_minibatches == 0
    assert torch.isfinite(after).all()
    agreement = same_direction(after - before, fp32_update)
    assert agreement > 0.9, f"only {agreement:.0%} of the LoRA moved as in fp32"


@pytest.mark.parametrize("name", ["no", "bf16", "fp16"])
def test_a_step_with_a_non_finite_loss_is_skipped_and_the_lora_kept(name):
    denoiser, precision, minibatches = policy(name)
    minibatches[0]["log_probs"][0, 0] = float("nan")  # the sampled log-prob: ratio and loss become NaN
    outcomes, before, after = one_step(denoiser, precision, minibatches)
    assert outcomes == ["nonfinite_loss"]
    assert torch.equal(before, after)


def test_an_fp16_overflow_is_computed_again_at_a_lower_scale_and_the_step_is_taken(fp32_update):
    denoiser, _, minibatches = policy("fp16")
    precision = MixedPrecision.create("fp16", "cpu", loss_scale=2.0**40)  # far past fp16's range: overflows
    outcomes, before, after = one_step(denoiser, precision, minibatches)
    assert outcomes == ["ok"] and precision.loss_scale < 2.0**16  # the epoch's samples were not thrown away
    assert same_direction(after - before, fp32_update) > 0.9  # and the overflowing tries left nothing behind


def test_a_gradient_that_overflows_at_every_scale_skips_the_step():
    denoiser, precision, minibatches = policy("fp16")
    minibatches[0]["advantages"][:] = 1e38  # the loss is finite in fp32, its gradient is not
    outcomes, before, after = one_step(denoiser, precision, minibatches)
    assert outcomes == ["nonfinite_gradient"] and torch.equal(before, after)


def test_skipped_steps_in_a_row_stop_the_run_with_the_cause_and_the_setting():
    fp32, fp16 = MixedPrecision.create("no", "cpu"), MixedPrecision.create("fp16", "cpu")
    assert count_skipped_steps(0, ["nonfinite_loss", "ok"], fp32, 1) == 0
    in_a_row = count_skipped_steps(0, ["nonfinite_gradient"] * (SKIPPED_STEPS_TO_STOP - 1), fp32, 1)
    with pytest.raises(UserError) as stop:
        count_skipped_steps(in_a_row, ["nonfinite_loss"], fp32, 2)
    assert "not finite" in str(stop.value) and "train_policy_learning_rate" in str(stop.value)
    with pytest.raises(UserError) as stop:
        count_skipped_steps(0, ["nonfinite_gradient"] * SKIPPED_STEPS_TO_STOP, fp16, 1)
    assert "mixed_precision=bf16" in str(stop.value)


@pytest.mark.stages
def test_a_diverging_run_stops_with_one_sentence_and_saves_no_non_finite_lora(tmp_path, tiny_checkpoint,
                                                                             random_reward_model):
    # a learning rate near float32's limit: the first step's LoRA is huge, the next forward overflows
    result = run_script("train_policy", f"--reward_model_path={random_reward_model}",
                        "--train_sample_batch_size=2", "--train_sample_num_batches_per_epoch=1",
                        "--train_policy_learning_rate=1e30", "--train_save_freq=100", "--train_policy_num_epochs=8",
                        "--train_preview_seeds=", cwd=tmp_path, checkpoint=tiny_checkpoint)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "not finite" in error and "Traceback" not in result.stderr
    outputs = tmp_path / "outputs"
    records = read_jsonl(str(outputs / "policy_metrics.jsonl"))
    assert sum(r["skipped_steps"] for r in records) >= SKIPPED_STEPS_TO_STOP
    assert not list(outputs.glob("*lora_epoch_*"))  # the run stopped before its first save
    assert math.isfinite(records[0]["loss"])


def test_a_lora_with_a_weight_that_is_not_finite_in_a_webui_file_is_never_saved(tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet()
    add_lora(unet, rank=4)
    with torch.no_grad():
        next(p for p in unet.parameters() if p.requires_grad)[0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(UserError) as refusal:
        save_lora(unet, str(tmp_path), 3)
    assert "not finite" in str(refusal.value) and list(tmp_path.iterdir()) == []
