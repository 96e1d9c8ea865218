"""GPU memory of a training call, estimated without a GPU or the memory: counted on the meta device.

The UNet runs forward and backward on meta tensors (shapes and dtypes, no data), and a dispatch mode
adds up the bytes of the tensors alive at each moment: the peak is what a caching allocator without
fragmentation would hold beyond the weights. Attention is counted as CUDA's fused SDPA (flash or
memory-efficient) keeps it, q, k, v, its output and a log-sum-exp per query, not as the meta device's
math fallback, which would hold every tokens x tokens matrix. What this leaves out: the CUDA context
and cuDNN/cuBLAS workspaces (~0.5-1 GiB, outside torch's allocator counters), fragmentation, and
autocast's fp32 norm outputs (counting with fp16 weights puts every activation in fp16).
"""

import weakref
from contextlib import contextmanager, nullcontext

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ddpo.lora import add_lora
from ddpo.sampling import sdxl_time_ids
from ddpo.training_calls import set_gradient_checkpointing


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages alive at once while entered, and their peak (views share their base's).

    A storage is alive until it is freed, not until the tensors seen here are: autograd saves an output
    for backward as a new tensor on the same storage, made in C++ where no Python mode sees it. So a
    storage whose seen tensors are all gone becomes a suspect, and suspects are checked for being
    freed whenever the count would set a new peak (between checks it can only be too high).
    """

    def __init__(self):
        super().__init__()
        self.alive, self.suspects, self.now, self.peak = {}, set(), 0, 0  # alive: key -> [seen tensors, bytes, ref]

    def _tensor_gone(self, key):
        entry = self.alive.get(key)
        if entry:
            entry[0] -= 1
            if entry[0] == 0:
                self.suspects.add(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.alive:
                    self.alive[key] = [0, storage.nbytes(), StorageWeakRef(storage)]
                    self.now += storage.nbytes()
                self.alive[key][0] += 1
                self.suspects.discard(key)
                weakref.finalize(tensor, self._tensor_gone, key)
        if self.now > self.peak:
            for key in [key for key in self.suspects if self.alive[key][2].expired()]:
                self.now -= self.alive.pop(key)[1]
                self.suspects.discard(key)
            self.peak = max(self.peak, self.now)
        return output


class _FusedAttention(torch.autograd.Function):
    """Shapes and saved tensors of fused SDPA: out (b, heads, queries, dv), log-sum-exp (b, heads, queries)."""

    @staticmethod
    def forward(ctx, query, key, value):
        output = query.new_empty((*query.shape[:-1], value.shape[-1]))
        ctx.save_for_backward(query, key, value, output, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


@contextmanager
def fused_attention():
    """Replace F.scaled_dot_product_attention (diffusers' attention processors call it) while counting."""
    original = torch.nn.functional.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        assert attn_mask is None and not is_causal, "the UNet's attention has no mask"
        return _FusedAttention.apply(query, key, value)

    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def meta_unet_inputs(config, images, height, width, dtype, device="meta"):
    """A guided call's UNet inputs for `images` latents: the CFG batch (2 x images, ...), zeros."""
    batch = 2 * images
    inputs = {"sample": torch.zeros(batch, config["in_channels"], height // 8, width // 8, dtype=dtype, device=device),
              "timestep": torch.zeros(batch, device=device),
              "encoder_hidden_states": torch.zeros(batch, 77, config["cross_attention_dim"], dtype=dtype,
                                                   device=device)}
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text embedding + 6 size ids
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, pooled, dtype=dtype, device=device),
            "time_ids": sdxl_time_ids(height, width).to(device, dtype).expand(batch, -1)}
    return inputs


def training_activation_bytes(config, lora_rank, checkpointing, timesteps_per_call, height, width, dtype,
                              device="meta"):
    """Peak bytes beyond the weights of one training call: `timesteps_per_call` guided UNet calls in one
    batch, forward and backward, with a rank-`lora_rank` LoRA (fp32, as add_lora makes it). On the meta
    device attention is counted as fused SDPA; on a real one (to check the count) it runs as it runs."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config).to(dtype)
    add_lora(unet, lora_rank)
    set_gradient_checkpointing(unet, checkpointing)
    unet.train()
    inputs = meta_unet_inputs(config, timesteps_per_call, height, width, dtype, device)
    with fused_attention() if device == "meta" else nullcontext(), LiveTensorBytes() as live:
        unet(**inputs).sample.float().sum().backward()
    return live.peak


def weight_bytes(config, lora_rank, dtype):
    """(frozen UNet weights in `dtype`, LoRA weights + gradients + AdamW's two moments, all fp32) in bytes."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    lora = sum(p.numel() for p in add_lora(unet, lora_rank))
    frozen = sum(p.numel() for p in unet.parameters()) - lora
    return frozen * dtype.itemsize, lora * 4 * 4
