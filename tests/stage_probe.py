"""A stage script run under `accelerate launch`, with each process recording what it did (for tests).

    accelerate launch ... tests/stage_probe.py <train_policy|generate> <probe_dir> [--name=value ...]

Each process appends JSON lines to <probe_dir>/rank<N>.jsonl: train_policy, a SHA-256 of its LoRA
weights after each epoch's updates; generate, the seed of each image it saves. The stage itself is
unchanged: the probe wraps one of its functions and then runs it as its own `__main__` would.
"""

import hashlib
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerate import PartialState  # noqa: E402

from utils.cli import run_stage  # noqa: E402


def record(probe_dir, entry):
    with open(os.path.join(probe_dir, f"rank{PartialState().process_index}.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")


def probe_train_policy(stage, probe_dir):
    train_epoch = stage.train_epoch

    def recorded(trainer, *args, **kwargs):
        means = train_epoch(trainer, *args, **kwargs)
        digest = hashlib.sha256()
        for name, parameter in sorted(trainer.unet.named_parameters()):
            if parameter.requires_grad:
                digest.update(name.encode() + parameter.detach().cpu().numpy().tobytes())
        record(probe_dir, {"lora_sha256": digest.hexdigest()})
        return means

    stage.train_epoch = recorded


def probe_generate(stage, probe_dir):
    save_image = stage.save_image

    def recorded(folder, seed, *args):
        record(probe_dir, {"seed": seed})
        return save_image(folder, seed, *args)

    stage.save_image = recorded


if __name__ == "__main__":
    stage_name, probe_dir = sys.argv[1:3]
    sys.argv = [stage_name + ".py", *sys.argv[3:]]
    stage = importlib.import_module(stage_name)
    {"train_policy": probe_train_policy, "generate": probe_generate}[stage_name](stage, probe_dir)
    run_stage(stage.main, stage.USED_SETTINGS)
