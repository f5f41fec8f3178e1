"""gpa-hf's Triton kernels for a GPU decoding step: a Qwen3 decoder layer in six kernels.

A published-size decoding step compiled by `torch.compile` runs 453 kernels on an H100 (16 a layer) of about 3 us
each, for 0.43 GB of bf16 weights that stream in 0.13 ms: the step is bound by its number of kernels, not by memory.
[`GpaFusedDecodingStep`] runs one token per sequence through the LM in six kernels a layer, each program reading its
rows of the weights once for the whole batch, in one go (no loop over the input size to wait on):

1. `rms_norm_linear_kernel`: the input RMSNorm and the query / key / value products;
2. `attention_split_kernel`: per-head query and key norms, rotary embedding, the new key and value written into the
   static cache (and attended from registers), and the query's attention over one split of the cached positions
   (flash-decoding), one program per (sequence, key-value head, split);
3. `attention_merge_kernel`: each query head's splits merged;
4. `linear_residual_kernel`: the output product and the residual add;
5. `rms_norm_linear_kernel` (gated): the post-attention RMSNorm, the gate and up products, SiLU(gate) * up;
6. `linear_residual_kernel`: the down product and the residual add.

Products accumulate in float32 and the residual stream stays float32 between kernels (the stock layers round it to
the model's dtype after every add). On Hopper GPUs and later each kernel is a programmatic dependent launch: it starts
while the previous one finishes and loads its weights (the attention: the positions cached by earlier steps) before
waiting for it. On an H200 the published LM's step takes 0.47 ms (0.64 ms without dependent launches; 1.39 ms
compiled by `torch.compile`). Importing this module needs `triton` (CUDA builds of torch bring it). The
kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter (`TRITON_INTERPRET=1` before the import),
which is how the tests compare them with the stock layers on machines without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

LOG2_E = 1.4426950408889634

# One kernel launch of a step: (kernel, grid, positional arguments, constants and launch options).
Launch = tuple[triton.JITFunction, tuple[int, ...], tuple, dict]


@triton.jit
def _wait_for_previous_kernel(PDL: tl.constexpr):
    """Under programmatic dependent launch: wait until the previous kernel has finished (its writes visible), then
    let the next kernel start. In that order, a kernel starts only once every program of this one has waited, so
    every kernel before this one has finished: what the next kernel loads before its own wait is complete."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def rms_norm_linear_kernel(
    x_ptr,
    norm_ptr,
    first_weight_ptr,
    second_weight_ptr,
    third_weight_ptr,
    out_ptr,
    eps,
    B: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    FIRST_ROWS: tl.constexpr,
    SECOND_ROWS: tl.constexpr,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GATED: tl.constexpr,
    PDL: tl.constexpr,
):
    """`BLOCK_N` outputs of a product with RMSNorm(x), for every sequence; x is the float32 residual stream.

    Not gated: rows of one weight split in up to three (query, key, value); a block of rows lies in one of them.
    Gated: SiLU(first weight's rows . h) * (second weight's rows . h), the MLP's gate and up products.
    `PDL`: launched as a programmatic dependent launch, it loads its weights before waiting for the previous kernel.
    """
    n0 = tl.program_id(0) * BLOCK_N
    n = tl.arange(0, BLOCK_N)
    k = tl.arange(0, K_PAD)
    k_mask = k < K
    if GATED:
        mask = ((n0 + n) < N)[:, None] & k_mask[None, :]
        offsets = (n0 + n)[:, None] * K + k[None, :]
        gate_weight = tl.load(first_weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        up_weight = tl.load(second_weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        if n0 < FIRST_ROWS:
            weight_ptr = first_weight_ptr + n0 * K
        elif n0 < FIRST_ROWS + SECOND_ROWS:
            weight_ptr = second_weight_ptr + (n0 - FIRST_ROWS) * K
        else:
            weight_ptr = third_weight_ptr + (n0 - FIRST_ROWS - SECOND_ROWS) * K
        weight = tl.load(weight_ptr + n[:, None] * K + k[None, :], mask=k_mask[None, :], other=0.0).to(tl.float32)
    norm = tl.load(norm_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
    _wait_for_previous_kernel(PDL)
    for b in tl.static_range(B):
        x = tl.load(x_ptr + b * K + k, mask=k_mask, other=0.0)
        h = x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / K + eps)) * norm
        if GATED:
            gate = tl.sum(gate_weight * h[None, :], axis=1)
            up = tl.sum(up_weight * h[None, :], axis=1)
            tl.store(out_ptr + b * N + n0 + n, gate * tl.sigmoid(gate) * up, mask=(n0 + n) < N)
        else:
            tl.store(out_ptr + b * N + n0 + n, tl.sum(weight * h[None, :], axis=1))


@triton.jit
def linear_residual_kernel(
    input_ptr,
    weight_ptr,
    x_ptr,
    B: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    """x[:, n] += weight[n] . input, for `BLOCK_N` columns n of the float32 residual stream of every sequence."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    k = tl.arange(0, K_PAD)
    k_mask = k < K
    weight = tl.load(weight_ptr + n[:, None] * K + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(
        tl.float32
    )
    _wait_for_previous_kernel(PDL)
    for b in tl.static_range(B):
        product = tl.sum(weight * tl.load(input_ptr + b * K + k, mask=k_mask, other=0.0)[None, :], axis=1)
        residual = x_ptr + b * N + n
        tl.store(residual, tl.load(residual, mask=n_mask, other=0.0) + product, mask=n_mask)


@triton.jit
def _normed_rotated(
    heads_ptr, norm_ptr, cos, sin, d, partner, sign, d_mask, rows_mask, eps, D: tl.constexpr, ROWS: tl.constexpr
):
    """RMSNorm, then rotary embedding at one position, of `ROWS` consecutive heads of D numbers: `(ROWS, D_PAD)`."""
    mask = rows_mask[:, None] & d_mask[None, :]
    heads = heads_ptr + tl.arange(0, ROWS)[:, None] * D
    values = tl.load(heads + d[None, :], mask=mask, other=0.0)
    partners = tl.load(heads + partner[None, :], mask=mask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(values * values, axis=1) / D + eps)
    weight = tl.load(norm_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    partner_weight = tl.load(norm_ptr + partner, mask=d_mask, other=0.0).to(tl.float32)
    normed = values * rstd[:, None] * weight[None, :]
    normed_partners = partners * rstd[:, None] * partner_weight[None, :]
    return normed * cos[None, :] + sign[None, :] * normed_partners * sin[None, :]


@triton.jit
def _cached_tile(keys_ptr, values_ptr, valid_ptr, stride_position, first, slot, d, d_mask, BLOCK_T: tl.constexpr):
    """Positions `first ... first + BLOCK_T` of one sequence and key-value head: which are attended (up to the slot,
    not padding), and the float32 keys and values cached before the slot (the slot's own are the new ones)."""
    t = first + tl.arange(0, BLOCK_T)
    attended = (t <= slot) & (tl.load(valid_ptr + t, mask=t <= slot, other=0) != 0)
    offsets = t[:, None] * stride_position + d[None, :]
    mask = (attended & (t < slot))[:, None] & d_mask[None, :]
    keys = tl.load(keys_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    values = tl.load(values_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return t, attended, keys, values


@triton.jit
def _attend_tile(query, is_new, attended, keys, values, new_key, new_value, running_max, total, weighted):
    """Online softmax of the queries `(GROUP_PAD, D_PAD)` over one tile of positions, the new token's (`is_new`)
    key and value taken from registers: the running maximum, sum of weights and weighted sum of values."""
    keys = tl.where(is_new[:, None], new_key.to(tl.float32), keys)
    values = tl.where(is_new[:, None], new_value.to(tl.float32), values)
    scores = tl.sum(query[:, None, :] * keys[None, :, :], axis=2)
    scores = tl.where(attended[None, :], scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing attended yet: no NaN from -inf - -inf
    weights = tl.exp2(scores - shift[:, None])
    decay = tl.exp2(running_max - shift)
    total = total * decay + tl.sum(weights, axis=1)
    weighted = weighted * decay[:, None] + tl.sum(weights[:, :, None] * values[None, :, :], axis=1)
    return new_max, total, weighted


@triton.jit
def attention_split_kernel(
    qkv_ptr,
    q_norm_ptr,
    k_norm_ptr,
    cos_ptr,
    sin_ptr,
    position_ids_ptr,
    slot_ptr,
    key_cache_ptr,
    value_cache_ptr,
    cache_stride_batch,
    cache_stride_head,
    cache_stride_position,
    valid_ptr,
    valid_stride,
    max_ptr,
    sum_ptr,
    partial_ptr,
    eps,
    scale_log2,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    NH: tl.constexpr,
    KVH: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    SPLITS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PDL: tl.constexpr,
):
    """One key-value head's queries over the cached positions `split * CHUNK ...` up to the new token's slot.

    The queries and the new key get their per-head RMSNorm and rotary embedding here; the split that holds the slot
    writes the new key and value into the cache, and attends to them from registers (as rounded to the cache's
    dtype). Each query head's running maximum (log2 units), sum of weights and weighted sum of values for the split
    are written for the merge; splits past the slot write nothing (the merge reads the splits up to the slot's).
    `PDL`: the positions cached by earlier steps are loaded before waiting for the previous kernel's query, key and
    value. That is safe (see `_wait_for_previous_kernel`): every kernel before the previous one, the earlier steps'
    cache writes included, has finished when this one starts.
    """
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(slot_ptr)
    start = split * CHUNK
    if start <= slot:
        HALF: tl.constexpr = D // 2
        d = tl.arange(0, D_PAD)
        d_mask = d < D
        partner = tl.where(d < HALF, d + HALF, d - HALF)  # rotary embedding pairs element i with i + D / 2
        sign = tl.where(d < HALF, -1.0, 1.0)
        position = tl.load(position_ids_ptr + row)
        cos = tl.load(cos_ptr + position * D + d, mask=d_mask, other=0.0)
        sin = tl.load(sin_ptr + position * D + d, mask=d_mask, other=0.0)
        base = row * cache_stride_batch + kv_head * cache_stride_head
        keys_ptr, values_ptr, valid_ptr = key_cache_ptr + base, value_cache_ptr + base, valid_ptr + row * valid_stride
        t, attended, keys, values = _cached_tile(
            keys_ptr, values_ptr, valid_ptr, cache_stride_position, start, slot, d, d_mask, BLOCK_T
        )
        _wait_for_previous_kernel(PDL)
        qkv = qkv_ptr + row * (NH + 2 * KVH) * D
        group = tl.arange(0, GROUP_PAD)
        group_mask = group < GROUP
        query = _normed_rotated(
            qkv + kv_head * GROUP * D, q_norm_ptr, cos, sin, d, partner, sign, d_mask, group_mask, eps, D, GROUP_PAD
        )
        query = query * scale_log2
        one = tl.arange(0, 1) < 1
        new_key = _normed_rotated(
            qkv + (NH + kv_head) * D, k_norm_ptr, cos, sin, d, partner, sign, d_mask, one, eps, D, 1
        ).to(key_cache_ptr.dtype.element_ty)
        new_value = tl.load(qkv + (NH + KVH + kv_head) * D + d[None, :], mask=d_mask[None, :], other=0.0).to(
            value_cache_ptr.dtype.element_ty
        )
        if slot < start + CHUNK:  # this split holds the new token: its key and value go into the cache
            new = base + slot * cache_stride_position + d[None, :]
            tl.store(key_cache_ptr + new, new_key, mask=d_mask[None, :])
            tl.store(value_cache_ptr + new, new_value, mask=d_mask[None, :])
        running_max = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        total = tl.zeros((GROUP_PAD,), tl.float32)
        weighted = tl.zeros((GROUP_PAD, D_PAD), tl.float32)
        running_max, total, weighted = _attend_tile(
            query, t == slot, attended, keys, values, new_key, new_value, running_max, total, weighted
        )
        for t0 in range(BLOCK_T, CHUNK, BLOCK_T):  # a fixed count: positions past the slot are masked, never read
            t, attended, keys, values = _cached_tile(
                keys_ptr, values_ptr, valid_ptr, cache_stride_position, start + t0, slot, d, d_mask, BLOCK_T
            )
            running_max, total, weighted = _attend_tile(
                query, t == slot, attended, keys, values, new_key, new_value, running_max, total, weighted
            )
        index = (row * NH + kv_head * GROUP + group) * SPLITS + split
        tl.store(max_ptr + index, running_max, mask=group_mask)
        tl.store(sum_ptr + index, total, mask=group_mask)
        tl.store(partial_ptr + index[:, None] * D + d[None, :], weighted, mask=group_mask[:, None] & d_mask[None, :])


@triton.jit
def attention_merge_kernel(
    max_ptr,
    sum_ptr,
    partial_ptr,
    slot_ptr,
    out_ptr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    NH: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    """One query head's attention output from its splits (those up to the slot's)."""
    _wait_for_previous_kernel(PDL)
    row = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_mask = splits < tl.load(slot_ptr) // CHUNK + 1
    d = tl.arange(0, D_PAD)
    d_mask = d < D
    index = (row * NH + head) * SPLITS + splits
    maxima = tl.load(max_ptr + index, mask=split_mask, other=float("-inf"))
    # A split with nothing attended (all its positions padding) has a maximum of -inf and weighs 0.
    scale = tl.where(maxima == float("-inf"), 0.0, tl.exp2(maxima - tl.max(maxima, axis=0)))
    total = tl.sum(tl.load(sum_ptr + index, mask=split_mask, other=0.0) * scale, axis=0)
    partial = tl.load(
        partial_ptr + index[:, None] * D + d[None, :], mask=split_mask[:, None] & d_mask[None, :], other=0.0
    )
    tl.store(out_ptr + (row * NH + head) * D + d, tl.sum(partial * scale[:, None], axis=0) / total, mask=d_mask)


@dataclass(frozen=True)
class FusedStepBlocks:
    """Tile sizes and launch settings of the fused step's kernels.

    `*_block_n`: output rows per program of the products (each program holds its rows' weights whole: rows x input
    size); `attention_block`: cached positions per iteration of the attention; `max_splits`: at most this many
    splits of the cache per key-value head (each split at least `attention_block` positions);
    `dependent_launch`: on GPUs that have it (compute capability 9.0 and later), launch each kernel as a
    programmatic dependent launch, so that it starts, and loads its weights, while the previous one finishes.
    """

    qkv_block_n: int = 16
    output_block_n: int = 4
    gate_up_block_n: int = 16
    down_block_n: int = 4
    attention_block: int = 16
    max_splits: int = 32
    attention_num_warps: int = 4
    dependent_launch: bool = True


def product_num_warps(rows: int, columns: int) -> int:
    """Warps for a program holding a `rows x columns` weight tile: about 64 of its numbers per thread."""
    return max(1, min(8, rows * columns // (64 * 32)))


# The tile sizes a step uses unless given others (`benchmarks/gpa_gpu_profile.py --fused-blocks` tries others).
DEFAULT_FUSED_STEP_BLOCKS = FusedStepBlocks()


def fused_step_unsupported(config) -> list[str]:
    """What in a Qwen3 config the fused step does not implement (empty: it runs it)."""
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (needs 'silu')")
    if getattr(config, "attention_bias", False):
        problems.append("attention_bias=True")
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        problems.append(f"sliding_window={config.sliding_window}")
    if config.num_attention_heads % config.num_key_value_heads:
        problems.append(f"{config.num_attention_heads} query heads over {config.num_key_value_heads} key-value heads")
    return problems


def plain_weight(module: nn.Module, name: str) -> torch.Tensor:
    """The float weight of a linear layer, or an error naming the layer (quantized layers have none)."""
    if type(module) is not nn.Linear:
        raise ValueError(
            f"the fused decoding step reads plain nn.Linear weights; {name} is a "
            f"{type(module).__module__}.{type(module).__name__} (do not quantize a model decoded on GPU)"
        )
    return module.weight.detach()


def layer_weights(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A decoder layer's weights as the kernels read them, fused projections or not (views, no copies)."""
    attention, mlp = layer.self_attn, layer.mlp
    if hasattr(attention, "qkv_proj"):
        q, k, v = plain_weight(attention.qkv_proj, "qkv_proj").split(attention.projection_sizes)
    else:
        q, k, v = (plain_weight(getattr(attention, name), name) for name in ("q_proj", "k_proj", "v_proj"))
    if hasattr(mlp, "gate_up_proj"):
        gate, up = plain_weight(mlp.gate_up_proj, "gate_up_proj").chunk(2)
    else:
        gate, up = plain_weight(mlp.gate_proj, "gate_proj"), plain_weight(mlp.up_proj, "up_proj")
    weights = {
        "input_norm": layer.input_layernorm.weight.detach(),
        "q": q,
        "k": k,
        "v": v,
        "q_norm": attention.q_norm.weight.detach(),
        "k_norm": attention.k_norm.weight.detach(),
        "o": plain_weight(attention.o_proj, "o_proj"),
        "post_norm": layer.post_attention_layernorm.weight.detach(),
        "gate": gate,
        "up": up,
        "down": plain_weight(mlp.down_proj, "down_proj"),
    }
    for name, weight in weights.items():
        if not weight.is_contiguous():
            raise ValueError(f"the fused decoding step needs contiguous weights; {name} has strides {weight.stride()}")
    return weights


def kernels_are_interpreted() -> bool:
    """Whether this module's kernels run in Triton's interpreter (on CPU tensors) rather than compiled."""
    return not isinstance(rms_norm_linear_kernel, triton.runtime.JITFunction)


class GpaFusedDecodingStep:
    """One decoding step of a Qwen3 LM (`Qwen3Model`) over a transformers `StaticCache`, in six kernels a layer.

    Built for one batch size and cache length (the static decoder's); weights are read from the LM's layers at
    every call, so training or loading new weights in place needs nothing more. Called with the new tokens, their
    position ids, the cache slot they are written at and the attended positions, it returns the final norm's
    hidden states `(batch, hidden)` in the LM's dtype, as `Qwen3Model` would for those tokens.
    """

    def __init__(self, lm: nn.Module, batch_size: int, max_cache_len: int, blocks: FusedStepBlocks | None = None):
        config = lm.config
        problems = fused_step_unsupported(config)
        if problems:
            raise ValueError(f"the fused decoding step does not support {'; '.join(problems)}")
        device = lm.embed_tokens.weight.device
        if device.type != "cuda" and not kernels_are_interpreted():
            raise ValueError(
                f"the fused decoding step runs on CUDA devices (the LM is on {device}); on CPU only in Triton's "
                "interpreter (TRITON_INTERPRET=1), for tests"
            )
        for layer in lm.layers:  # quantized or strided weights are named now, not at the first step
            layer_weights(layer)
        self.lm = lm
        self.blocks = blocks = blocks or DEFAULT_FUSED_STEP_BLOCKS
        self.dependent_launch = (
            blocks.dependent_launch and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
        )
        self.batch_size = batch_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.eps = float(config.rms_norm_eps)
        self.scale_log2 = self.head_dim**-0.5 * LOG2_E
        with torch.no_grad():  # rotary tables for every cache position, float32, from the LM's own embedding
            positions = torch.arange(max_cache_len, device=device)[None]
            cos, sin = lm.rotary_emb(torch.zeros(1, device=device, dtype=torch.float32), positions)
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        if self.cos.shape[-1] != self.head_dim:
            raise ValueError(
                f"the fused decoding step rotates whole heads ({self.head_dim}); this LM rotates {self.cos.shape[-1]}"
            )
        cache_size = batch_size * self.kv_heads * max_cache_len * self.head_dim
        if cache_size >= 2**31:  # the kernels address a layer's cache with 32-bit offsets
            raise ValueError(
                f"the fused decoding step addresses at most 2**31 cached numbers a layer; batch {batch_size} x cache "
                f"length {max_cache_len} needs {cache_size}"
            )
        self.chunk = max(blocks.attention_block, triton.next_power_of_2(math.ceil(max_cache_len / blocks.max_splits)))
        self.splits = math.ceil(max_cache_len / self.chunk)
        # A block of query / key / value rows lies within one of them: the largest power of two dividing all three.
        parts = (self.heads * self.head_dim, self.kv_heads * self.head_dim)
        self.qkv_block_n = min(blocks.qkv_block_n, math.gcd(*parts) & -math.gcd(*parts))
        floats = {"device": device, "dtype": torch.float32}
        self.residual = torch.zeros(batch_size, self.hidden_size, **floats)
        self.qkv = torch.zeros(batch_size, sum(parts) + parts[1], **floats)
        self.split_max = torch.zeros(batch_size, self.heads, self.splits, **floats)
        self.split_sum = torch.zeros(batch_size, self.heads, self.splits, **floats)
        self.split_values = torch.zeros(batch_size, self.heads, self.splits, self.head_dim, **floats)
        self.attention = torch.zeros(batch_size, self.heads * self.head_dim, **floats)
        self.activation = torch.zeros(batch_size, self.intermediate_size, **floats)

    def __call__(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        slot: torch.LongTensor,
        attended: torch.BoolTensor,
        cache,
    ) -> torch.Tensor:
        """Final hidden states `(batch, hidden)` for `input_ids` `(batch,)` at `position_ids` `(batch,)`.

        `slot` `(1,)`: the cache position the new keys and values are written at (the same for every sequence);
        `attended` `(batch, max_cache_len)`: which cached positions each sequence may attend to, of those up to
        the slot (False for its prompt's left padding); `cache`: the `StaticCache` the prompt was run into.
        """
        return self.final_hidden(self.residual_stream(input_ids, position_ids, slot, attended, cache))

    def residual_stream(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        slot: torch.LongTensor,
        attended: torch.BoolTensor,
        cache,
    ) -> torch.Tensor:
        """The float32 residual stream `(batch, hidden)` after the last layer (before the final norm)."""
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(f"this fused step was built for batch size {self.batch_size}; got {input_ids.shape[0]}")
        self.residual.copy_(self.lm.embed_tokens(input_ids))
        for kernel, grid, arguments, options in self.launches(position_ids, slot, attended, cache):
            kernel[grid](*arguments, **options)
        return self.residual

    def final_hidden(self, residual: torch.Tensor) -> torch.Tensor:
        """The LM's final norm of the residual stream, in the LM's dtype."""
        return self.lm.norm(residual).to(self.lm.embed_tokens.weight.dtype)

    def launches(
        self, position_ids: torch.LongTensor, slot: torch.LongTensor, attended: torch.BoolTensor, cache
    ) -> Iterator[Launch]:
        """The step's kernel launches after the embedding, in order: (kernel, grid, arguments, constant options)."""
        blocks, batch = self.blocks, self.batch_size
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        hidden, intermediate = self.hidden_size, self.intermediate_size
        hidden_pad, intermediate_pad = triton.next_power_of_2(hidden), triton.next_power_of_2(intermediate)
        attention_pad = triton.next_power_of_2(heads * head_dim)
        group = heads // kv_heads
        head_shape = {"D": head_dim, "D_PAD": triton.next_power_of_2(head_dim), "NH": heads}
        splits = {"SPLITS": self.splits, "CHUNK": self.chunk}
        valid = attended.view(torch.uint8)
        rows = self.qkv.shape[1]
        launch = self.launch_settings()
        for index, layer in enumerate(self.lm.layers):
            weights = layer_weights(layer)
            keys, values = cache.layers[index].keys, cache.layers[index].values
            yield (
                rms_norm_linear_kernel,
                (rows // self.qkv_block_n,),
                (self.residual, weights["input_norm"], weights["q"], weights["k"], weights["v"], self.qkv, self.eps),
                {
                    "B": batch,
                    "K": hidden,
                    "K_PAD": hidden_pad,
                    "FIRST_ROWS": heads * head_dim,
                    "SECOND_ROWS": kv_heads * head_dim,
                    "N": rows,
                    "BLOCK_N": self.qkv_block_n,
                    "GATED": False,
                    "num_warps": product_num_warps(self.qkv_block_n, hidden_pad),
                    **launch,
                },
            )
            yield (
                attention_split_kernel,
                (batch, kv_heads, self.splits),
                (
                    self.qkv,
                    weights["q_norm"],
                    weights["k_norm"],
                    self.cos,
                    self.sin,
                    position_ids,
                    slot,
                    keys,
                    values,
                    *keys.stride()[:3],
                    valid,
                    valid.stride(0),
                    self.split_max,
                    self.split_sum,
                    self.split_values,
                    self.eps,
                    self.scale_log2,
                ),
                {
                    **head_shape,
                    **splits,
                    "KVH": kv_heads,
                    "GROUP": group,
                    "GROUP_PAD": triton.next_power_of_2(group),
                    "BLOCK_T": blocks.attention_block,
                    "num_warps": blocks.attention_num_warps,
                    **launch,
                },
            )
            yield (
                attention_merge_kernel,
                (batch, heads),
                (self.split_max, self.split_sum, self.split_values, slot, self.attention),
                {**head_shape, **splits, "SPLITS_PAD": triton.next_power_of_2(self.splits), **launch},
            )
            yield self.residual_product(
                self.attention, weights["o"], heads * head_dim, attention_pad, blocks.output_block_n
            )
            yield (
                rms_norm_linear_kernel,
                (triton.cdiv(intermediate, blocks.gate_up_block_n),),
                (
                    self.residual,
                    weights["post_norm"],
                    weights["gate"],
                    weights["up"],
                    weights["up"],  # the third weight, read only by the ungated products
                    self.activation,
                    self.eps,
                ),
                {
                    "B": batch,
                    "K": hidden,
                    "K_PAD": hidden_pad,
                    "FIRST_ROWS": intermediate,
                    "SECOND_ROWS": intermediate,
                    "N": intermediate,
                    "BLOCK_N": blocks.gate_up_block_n,
                    "GATED": True,
                    "num_warps": product_num_warps(2 * blocks.gate_up_block_n, hidden_pad),
                    **launch,
                },
            )
            yield self.residual_product(
                self.activation, weights["down"], intermediate, intermediate_pad, blocks.down_block_n
            )

    def launch_settings(self) -> dict:
        """Every kernel's `PDL` constant, and Triton's `launch_pdl` option where it is set."""
        return {"PDL": True, "launch_pdl": True} if self.dependent_launch else {"PDL": False}

    def residual_product(
        self, inputs: torch.Tensor, weight: torch.Tensor, size: int, size_pad: int, block_n: int
    ) -> Launch:
        """The launch of residual += inputs @ weight.T (the attention's output product, the MLP's down product)."""
        options = {"B": self.batch_size, "K": size, "K_PAD": size_pad, "N": self.hidden_size, "BLOCK_N": block_n}
        options.update(num_warps=product_num_warps(block_n, size_pad), **self.launch_settings())
        grid = (triton.cdiv(self.hidden_size, block_n),)
        return linear_residual_kernel, grid, (inputs, weight, self.residual), options


__all__ = [
    "DEFAULT_FUSED_STEP_BLOCKS",
    "FusedStepBlocks",
    "GpaFusedDecodingStep",
    "fused_step_unsupported",
    "kernels_are_interpreted",
]
