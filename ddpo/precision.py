"""Mixed precision for DDPO training: frozen weights in a half dtype, the LoRA in fp32, autocast, and for
fp16 dynamic loss scaling; a step whose loss or gradients are not finite is skipped, not taken.

Autocast is PyTorch's own (torch.autocast), not accelerate's, which turns fp16 off on a CPU: the test
suite runs the same training step in every precision that a GPU will; only the device type differs.

fp16's loss scaling is done here rather than by torch's GradScaler, because an epoch makes one optimizer
step (upstream's schedule): GradScaler finds its scale by skipping steps that overflow, and every skip
would throw away a whole epoch of samples. Here each minibatch's gradient is checked as it is made; one
that overflows is computed again at half the scale, and the step sums every minibatch's gradient, each
divided by its own scale. Without an overflow this is exactly GradScaler's arithmetic.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}
INITIAL_LOSS_SCALE = 2.0**16  # torch's GradScaler default, as upstream's GradScaler()
GROWTH_INTERVAL = 2000  # clean minibatches before the scale doubles again (GradScaler's default, in steps)
MIN_LOSS_SCALE = 2.0**-16  # below this an overflow is not fp16's range but a diverging model


def resolve_mixed_precision(setting, device_type):
    """The mixed_precision setting with "auto" resolved: fp16 (upstream's) on CUDA, fp32 elsewhere."""
    if setting == "auto":
        return "fp16" if device_type == "cuda" else "no"
    return setting


def gradients_are_finite(parameters):
    return bool(torch.stack([torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]).all())


@dataclass
class MixedPrecision:
    name: str  # "fp16", "bf16" or "no"
    device_type: str  # "cuda", "cpu", ...
    loss_scale: float = 1.0
    clean_minibatches: int = 0

    @classmethod
    def create(cls, name, device_type, loss_scale=INITIAL_LOSS_SCALE):
        return cls(name, device_type, loss_scale if name == "fp16" else 1.0)

    @property
    def weights_dtype(self):
        return WEIGHT_DTYPES[self.name]

    def autocast(self):
        """The context of every UNet call: matmuls and convolutions in the half dtype, LoRA weights kept fp32."""
        if self.name == "no":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.weights_dtype)

    def backward(self, loss):
        # fp16's small gradients would underflow to 0: the loss is scaled up, and accumulate() divides it out
        (loss * self.loss_scale).backward()

    def accumulate(self, compute_gradient, parameters, total):
        """Run `compute_gradient()` (backward into the parameters' .grad), add the gradient to `total`, and
        return its result. fp16 retries an overflow at half the scale.

        A gradient that stays non-finite is added all the same: the step's sum is then non-finite on every
        process once all-reduced, so they all skip that step alike.
        """
        while True:
            result = compute_gradient()
            finite = gradients_are_finite(parameters)
            last_try = finite or self.name != "fp16" or self.loss_scale / 2 < MIN_LOSS_SCALE
            if last_try:
                for summed, p in zip(total, parameters):
                    summed += p.grad / self.loss_scale
            for p in parameters:
                p.grad = None
            if last_try:
                break
            self.loss_scale /= 2
            self.clean_minibatches = 0
        if finite and self.name == "fp16":
            self.clean_minibatches += 1
            if self.clean_minibatches % GROWTH_INTERVAL == 0:
                self.loss_scale *= 2
        return result

    def state_dict(self):
        return {"name": self.name, "loss_scale": self.loss_scale, "clean_minibatches": self.clean_minibatches}

    def load_state_dict(self, state):
        """Take over a saved fp16 run's loss scale; a state saved in another precision (whose scale is 1) is
        not fp16's, and fp16 then starts at its initial scale. A state from before names were saved is told by
        its scale: fp16 scales start at 2**16 and are powers of two, a scale of 1 comes from bf16 or fp32."""
        if not state or self.name != "fp16" or not math.isfinite(state.get("loss_scale", math.nan)):
            return
        if state.get("name", "fp16" if state["loss_scale"] != 1.0 else "no") == "fp16":
            self.loss_scale, self.clean_minibatches = state["loss_scale"], state["clean_minibatches"]
