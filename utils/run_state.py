"""train_policy's resumable state, written at the end of every epoch, so a kill loses at most the epoch
in progress (the LoRA files are only saved every train_save_freq epochs).

outputs/resume_state.pt holds the epoch, the LoRA, the optimizer and grad scaler, the RNG and how many
metrics lines were written by then; plain tensors and numbers, loaded with torch.load(weights_only=True).
It is replaced (temp file + rename) each epoch: it is the run's own bookkeeping, not a saved LoRA.
"""

import os

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from utils.errors import UserError
from utils.files import writing
from utils.lora_files import epoch_files, latest_lora, load_lora_into_unet

STATE_FILE = "resume_state.pt"


def lora_is_finite(unet):
    return all(torch.isfinite(p).all() for p in unet.parameters() if p.requires_grad)


def save_run_state(path, epoch, unet, optimizer, precision, metrics_path):
    with open(metrics_path, "rb") as f:
        metrics_lines = sum(1 for _ in f)
    state = {
        "epoch": epoch,
        "lora": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(unet).items()},
        "optimizer": optimizer.state_dict(),
        "grad_scaler": precision.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "metrics_lines": metrics_lines,
    }
    with writing(path) as temp_path:
        torch.save(state, temp_path)


def load_run_state(path):
    """The state saved at `path`; a file that is not one is an error that says what to do."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        epoch = state["epoch"]
        if not isinstance(epoch, int) or not {"lora", "optimizer", "rng", "metrics_lines"} <= set(state):
            raise KeyError("fields")
    except Exception as error:  # a pickle, another file, a truncated one: torch raises many kinds
        raise UserError(f"{path} is not a resume state train_policy can read ({type(error).__name__}); move it "
                        "away to resume from the newest saved epoch instead.") from None
    return state


def restore_run_state(state, unet, optimizer, precision, path):
    """Put the LoRA, optimizer, scaler and RNG back as they were at the end of state["epoch"]."""
    expected = get_peft_model_state_dict(unet)
    if {k: tuple(v.shape) for k, v in expected.items()} != {k: tuple(v.shape) for k, v in state["lora"].items()}:
        raise UserError(f"{path} holds a LoRA of another shape (lora_rank changed?): set lora_rank as it was, "
                        "or move it and the saved LoRAs away to start afresh.")
    set_peft_model_state_dict(unet, state["lora"], adapter_name="default")
    optimizer.load_state_dict(state["optimizer"])
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


def resume_training(lora_path, prefix, unet, optimizer, precision, metrics_path, print):
    """The first epoch to train: after the resume state or the newest saved LoRA, whichever is newer.

    Only files named with `prefix` (lora_name_prefix) are this run's.
    """
    saved_epoch, saved_path = latest_lora(lora_path, prefix)
    state_path = os.path.join(lora_path, prefix + STATE_FILE)
    state = load_run_state(state_path) if os.path.isfile(state_path) else None
    if state and state["epoch"] >= saved_epoch:
        restore_run_state(state, unet, optimizer, precision, state_path)
        keep_metrics_lines(metrics_path, state["metrics_lines"])
        print(f"resuming after epoch {state['epoch']} from {state_path}")
        return state["epoch"] + 1
    if saved_path:  # saved before resume states existed, or the state was moved away
        load_lora_into_unet(unet, saved_path)
        optimizer_path = epoch_files(lora_path, saved_epoch, prefix)["optimizer"]
        if os.path.isfile(optimizer_path):
            optimizer.load_state_dict(torch.load(optimizer_path, map_location="cpu", weights_only=True))
        print(f"resuming after epoch {saved_epoch} from {saved_path}")
        return saved_epoch + 1
    return 1
