"""train_policy's resumable state, written at the end of every epoch, so a kill loses at most the epoch
in progress (the LoRA files are only saved every train_save_freq epochs).

outputs/resume_state.pt holds the epoch, the model family, the LoRA, the optimizer and grad scaler, the RNG
and how many metrics lines were written by then (also at the start, as epoch 0, so that a kill during the
first epoch finds the metrics file as it was); plain tensors and numbers, loaded with torch.load(weights_only=True).
It is replaced (temp file + rename) each epoch: it is the run's own bookkeeping, not a saved LoRA.
"""

import math
import os

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from utils.errors import UserError
from utils.families import FAMILY_NAMES
from utils.files import writing
from utils.lora_files import epoch_files, latest_lora, load_lora_into_unet

STATE_FILE = "resume_state.pt"
FIELDS = {"epoch", "lora", "optimizer", "rng", "metrics_lines"}  # and, since they were added, grad_scaler, family


def lora_is_finite(unet):
    return all(torch.isfinite(p).all() for p in unet.parameters() if p.requires_grad)


def save_state_file(state, path):
    """torch.save(state) to `path` (temp file + rename). Through a Python file object: torch's own file
    writer reports a full disk as a RuntimeError without errno ("unexpected pos ..."), a file object as the
    OSError ENOSPC that run_stage turns into its disk-full sentence."""
    with writing(path) as temp_path, open(temp_path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def save_run_state(path, epoch, unet, optimizer, precision, metrics_path, family):
    """The state after `epoch` (0: the start, before any epoch); `family` ("sd15", "sdxl") of the checkpoint."""
    metrics_lines = 0
    if os.path.isfile(metrics_path):
        with open(metrics_path, "rb") as f:
            metrics_lines = sum(1 for _ in f)
    state = {
        "epoch": epoch,
        "family": family,
        "lora": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(unet).items()},
        "optimizer": optimizer.state_dict(),
        "grad_scaler": precision.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "metrics_lines": metrics_lines,
    }
    save_state_file(state, path)


def _is_count(value):
    return type(value) is int and value >= 0


def _is_rng_state(value):
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def _state_problem(state):
    """Why `state` (torch.load's) is not a resume state train_policy wrote, or None."""
    if not isinstance(state, dict) or not FIELDS <= set(state):
        return f"it lacks the fields {', '.join(sorted(FIELDS - set(state)))}" if isinstance(state, dict) \
            else f"it holds a {type(state).__name__}, not the state's fields"
    rng, scaler = state["rng"], state.get("grad_scaler", {})
    checks = {
        "epoch": _is_count(state["epoch"]),
        "metrics_lines": _is_count(state["metrics_lines"]),
        "lora": isinstance(state["lora"], dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                        and v.is_floating_point() and bool(torch.isfinite(v).all())
                                                        for k, v in state["lora"].items()),
        "optimizer": isinstance(state["optimizer"], dict) and isinstance(state["optimizer"].get("state"), dict)
        and isinstance(state["optimizer"].get("param_groups"), list),
        "rng": isinstance(rng, dict) and _is_rng_state(rng.get("torch"))
        and rng["torch"].numel() == torch.get_rng_state().numel()
        and isinstance(rng.get("cuda"), list) and all(_is_rng_state(r) for r in rng["cuda"]),
        "grad_scaler": isinstance(scaler, dict) and (not scaler or (
            isinstance(scaler.get("loss_scale"), float) and math.isfinite(scaler["loss_scale"])
            and scaler["loss_scale"] > 0 and _is_count(scaler.get("clean_minibatches")))),
        "family": state.get("family", "sd15") in FAMILY_NAMES,
    }
    wrong = [name for name, ok in checks.items() if not ok]
    return f"its field {wrong[0]!r} is not what train_policy writes" if wrong else None


def load_run_state(path):
    """The state saved at `path`; a file that is not one is an error that says what to do."""
    advice = "move it away to resume from the newest saved epoch instead."
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle, another file, a truncated one: torch raises many kinds
        raise UserError(f"{path} is not a resume state train_policy can read ({type(error).__name__}); "
                        f"{advice}") from None
    problem = _state_problem(state)
    if problem:
        raise UserError(f"{path} is not a resume state train_policy can read ({problem}); {advice}")
    return state


def lora_family(keys):
    """The model family a UNet LoRA's peft keys were made for: only SD1.x has attention in its first down block."""
    return "sd15" if any(key.startswith("down_blocks.0.attentions.") for key in keys) else "sdxl"


def check_lora_fits(state_lora, saved_family, unet, family, path):
    """UserError naming `path` when its LoRA is of another model family (`saved_family`; None: told by its
    keys), UNet or rank than this run's."""
    expected = get_peft_model_state_dict(unet)
    saved_family = saved_family or lora_family(state_lora)
    advice = f"or move {path} and lora_path's saved LoRAs away to start afresh."
    if saved_family != family:
        raise UserError(f"{path} holds a LoRA of an {FAMILY_NAMES[saved_family]} model but checkpoint_path's model "
                        f"is {FAMILY_NAMES[family]}: point checkpoint_path at the model it was trained on, {advice}")
    if set(state_lora) != set(expected):
        raise UserError(f"{path} holds a LoRA of another UNet than checkpoint_path's: point checkpoint_path at the "
                        f"model it was trained on, {advice}")
    shapes = {k: (tuple(state_lora[k].shape), tuple(v.shape)) for k, v in expected.items()}
    wrong = [(key, saved, ours) for key, (saved, ours) in shapes.items() if saved != ours]
    if wrong:
        key, saved, _ = wrong[0]
        rank = saved[0] if "lora_A" in key else saved[-1]
        raise UserError(f"{path} holds a LoRA of rank {rank} but lora_rank is {unet.peft_config['default'].r}: "
                        f"set --lora_rank={rank}, {advice}")


def load_optimizer_state(optimizer, state, path, advice):
    """optimizer.load_state_dict(state), first checked against the optimizer's parameters: torch checks only the
    number of parameters, and moments of another shape (a LoRA of another rank) fail at the first step, after
    a whole epoch. UserError naming `path` (and `advice`, what to do) when it does not fit."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        saved_ids = [i for group in state["param_groups"] for i in group["params"]]
        moments = [(p, value) for i, p in zip(saved_ids, parameters) for value in state["state"].get(i, {}).values()
                   if isinstance(value, torch.Tensor) and value.dim() > 0]
        problem = (f"it holds {len(saved_ids)} parameters, this LoRA {len(parameters)}"
                   if len(saved_ids) != len(parameters) else None)
        for p, value in moments:
            if problem is None and value.shape != p.shape:
                problem = f"a moment of shape {tuple(value.shape)} for a weight of shape {tuple(p.shape)}"
        if problem is None:
            optimizer.load_state_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        problem = f"not an optimizer state ({type(error).__name__})"
    if problem:
        raise UserError(f"{path} does not fit this run's optimizer ({problem}: a LoRA of another rank or model?): "
                        f"{advice}")


def restore_run_state(state, unet, optimizer, precision, path, family):
    """Put the LoRA, optimizer, scaler and RNG back as they were at the end of state["epoch"]."""
    check_lora_fits(state["lora"], state.get("family"), unet, family, path)
    set_peft_model_state_dict(unet, state["lora"], adapter_name="default")
    load_optimizer_state(optimizer, state["optimizer"], path, "move it away to resume from the newest saved epoch.")
    precision.load_state_dict(state.get("grad_scaler", {}))
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def keep_metrics_lines(path, count):
    """Drop metrics lines written after the resumed epoch (by the epoch a kill interrupted)."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    if len(lines) > count:
        with writing(path) as temp_path, open(temp_path, "wb") as f:
            f.writelines(lines[:count])


def load_optimizer_file(optimizer, path, saved_path):
    """The optimizer state saved with an epoch's LoRA (the resume without a resume state)."""
    advice = f"move it away to resume from {saved_path} with a fresh optimizer."
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, garbage, a pickle of code: torch raises many kinds
        raise UserError(f"{path} is not an optimizer state train_policy can read ({type(error).__name__}); "
                        f"{advice}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not an optimizer state train_policy can read (it holds a "
                        f"{type(state).__name__}); {advice}")
    load_optimizer_state(optimizer, state, path, advice)


def resume_training(lora_path, prefix, unet, optimizer, precision, metrics_path, print, family):
    """(the first epoch to train, whether it resumed from the resume state): after the resume state or the
    newest saved LoRA, whichever is newer. Only files named with `prefix` (lora_name_prefix) are this run's.
    `family`: of checkpoint_path's model, which a saved LoRA must fit.
    """
    saved_epoch, saved_path = latest_lora(lora_path, prefix)
    state_path = os.path.join(lora_path, prefix + STATE_FILE)
    state = load_run_state(state_path) if os.path.isfile(state_path) else None
    if state and state["epoch"] >= saved_epoch:
        restore_run_state(state, unet, optimizer, precision, state_path, family)
        keep_metrics_lines(metrics_path, state["metrics_lines"])
        print(f"resuming after epoch {state['epoch']} from {state_path}" if state["epoch"]
              else f"starting again at epoch 1 (the last run was stopped during it; {state_path})")
        return state["epoch"] + 1, True
    if saved_path:  # saved before resume states existed, or the state was moved away
        load_lora_into_unet(unet, saved_path)
        optimizer_path = epoch_files(lora_path, saved_epoch, prefix)["optimizer"]
        if os.path.isfile(optimizer_path):
            load_optimizer_file(optimizer, optimizer_path, saved_path)
        print(f"resuming after epoch {saved_epoch} from {saved_path}")
        return saved_epoch + 1, False
    return 1, False
