"""Multi-scale deformable attention in Triton: forward and backward kernels, their host launchers.

Three layers (STYLE.md 6): the ``@triton.jit`` kernels; host launchers that check shape, dtype and contiguity,
allocate, and take their launch settings from ``_launch_settings``; ``gw_kernels.ms_deform_attn`` on top.

One program owns a tile of BLOCK_Q queries of one (batch, head) and walks every level and point of them, so the
program reads each query's locations and weights once and writes its (BLOCK_Q, D) output tile once. A corner's D
channels are contiguous in value (N, S, M, D) and are loaded as one (BLOCK_Q, BLOCK_D) gather; neighbouring queries
sample neighbouring corners, which the L1/L2 caches serve. Accumulation is in float32 whatever the value dtype.

Backward: the same walk; gradients of locations and weights are per sample and stored once, and the value gradient
is scattered with float32 atomic adds into a float32 buffer (cast to the value dtype at the end).

Under ``TRITON_INTERPRET=1`` (no GPU) the kernels run on CPU tensors with one fixed configuration: autotuning needs
a driver. On a GPU the block size and warp count are autotuned per (Lq, M, D). The level and point loops are
runtime loops on purpose: unrolling all 16 samples of the Swin-T shape (4 corner gathers each) made one sm_90
compile take 40 s instead of 1.4 s on the dev VM (and autotuning compiles every configuration).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["ms_deform_attn_forward_triton", "ms_deform_attn_backward_triton", "SUPPORTED_DTYPES", "interpreting"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _corner_offsets(n, m, start, row, column, height, width, inside, value_batch_stride, heads, offs_d, d_mask,
                    CHANNELS: tl.constexpr):
    # Offsets (BLOCK_Q, BLOCK_D) of one corner's channels in value (N, S, M, D), and the mask of the corners that
    # exist: in the map and belonging to a real, in-range sample.
    valid = inside & (row >= 0) & (row <= height - 1) & (column >= 0) & (column <= width - 1)
    token = start + row * width + column  # (BLOCK_Q,) index into S; garbage where not valid, never dereferenced
    offsets = n.to(tl.int64) * value_batch_stride + (token.to(tl.int64) * heads + m) * CHANNELS
    return offsets[:, None] + offs_d[None, :], valid[:, None] & d_mask[None, :]


@triton.jit
def _msda_forward_kernel(value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr, output_ptr,
                         value_batch_stride, queries, heads,
                         CHANNELS: tl.constexpr, LEVELS: tl.constexpr, POINTS: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    # value (N, S, M, D); locations (N, Lq, M, L, P, 2) float32; weights (N, Lq, M, L, P); output (N, Lq, M, D).
    # value_batch_stride = S * M * D comes from the host, where Python ints pick int32 or int64 as they need.
    # grid: (cdiv(Lq, BLOCK_Q), N * M)
    pid_q = tl.program_id(0)
    pid_nm = tl.program_id(1)
    n = pid_nm // heads
    m = pid_nm % heads
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < queries
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < CHANNELS
    # first (level 0, point 0) sample of each (n, q, m)
    sample_base = ((n.to(tl.int64) * queries + offs_q) * heads + m) * (LEVELS * POINTS)
    accumulator = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for level in range(LEVELS):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(starts_ptr + level).to(tl.int32)
        for point in range(POINTS):
            sample = sample_base + level * POINTS + point
            x = tl.load(locations_ptr + 2 * sample, mask=q_mask, other=-2.0)
            y = tl.load(locations_ptr + 2 * sample + 1, mask=q_mask, other=-2.0)
            attention = tl.load(weights_ptr + sample, mask=q_mask, other=0.0).to(tl.float32)
            h = y * height.to(tl.float32) - 0.5
            w = x * width.to(tl.float32) - 0.5
            inside = q_mask & (h > -1.0) & (w > -1.0) & (h < height.to(tl.float32)) & (w < width.to(tl.float32))
            h_low = tl.floor(h)
            w_low = tl.floor(w)
            lh = h - h_low
            lw = w - w_low
            hh = 1.0 - lh
            hw = 1.0 - lw
            # Clamp before the integer cast so a location far outside (or NaN) cannot overflow int32.
            row = tl.where(inside, h_low, -2.0).to(tl.int32)
            column = tl.where(inside, w_low, -2.0).to(tl.int32)
            offsets, valid = _corner_offsets(n, m, start, row, column, height, width, inside, value_batch_stride,
                                             heads, offs_d, d_mask, CHANNELS)
            corner = tl.load(value_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            accumulator += (attention * hh * hw)[:, None] * corner
            offsets, valid = _corner_offsets(n, m, start, row, column + 1, height, width, inside,
                                             value_batch_stride, heads, offs_d, d_mask, CHANNELS)
            corner = tl.load(value_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            accumulator += (attention * hh * lw)[:, None] * corner
            offsets, valid = _corner_offsets(n, m, start, row + 1, column, height, width, inside,
                                             value_batch_stride, heads, offs_d, d_mask, CHANNELS)
            corner = tl.load(value_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            accumulator += (attention * lh * hw)[:, None] * corner
            offsets, valid = _corner_offsets(n, m, start, row + 1, column + 1, height, width, inside,
                                             value_batch_stride, heads, offs_d, d_mask, CHANNELS)
            corner = tl.load(value_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            accumulator += (attention * lh * lw)[:, None] * corner
    out_offsets = ((n.to(tl.int64) * queries + offs_q) * heads + m) * CHANNELS
    tl.store(output_ptr + out_offsets[:, None] + offs_d[None, :],
             accumulator.to(output_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _corner_backward(value_ptr, grad_value_ptr, offsets, valid, grad, scale):
    # One corner: returns dot(grad, corner) per query (BLOCK_Q,) and scatters scale * grad into grad_value.
    corner = tl.load(value_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    tl.atomic_add(grad_value_ptr + offsets, scale[:, None] * grad, mask=valid)
    return tl.sum(grad * corner, axis=1)


@triton.jit
def _msda_backward_kernel(grad_output_ptr, value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr,
                          grad_value_ptr, grad_locations_ptr, grad_weights_ptr,
                          value_batch_stride, queries, heads,
                          CHANNELS: tl.constexpr, LEVELS: tl.constexpr, POINTS: tl.constexpr,
                          BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    # grad_output (N, Lq, M, D); grad_value (N, S, M, D) float32, zero on entry; grad_locations
    # (N, Lq, M, L, P, 2) float32 and grad_weights (N, Lq, M, L, P) fully written here.
    pid_q = tl.program_id(0)
    pid_nm = tl.program_id(1)
    n = pid_nm // heads
    m = pid_nm % heads
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < queries
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < CHANNELS
    row_offsets = ((n.to(tl.int64) * queries + offs_q) * heads + m) * CHANNELS
    grad = tl.load(grad_output_ptr + row_offsets[:, None] + offs_d[None, :],
                   mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # (BLOCK_Q, BLOCK_D)
    sample_base = ((n.to(tl.int64) * queries + offs_q) * heads + m) * (LEVELS * POINTS)
    for level in range(LEVELS):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(starts_ptr + level).to(tl.int32)
        for point in range(POINTS):
            sample = sample_base + level * POINTS + point
            x = tl.load(locations_ptr + 2 * sample, mask=q_mask, other=-2.0)
            y = tl.load(locations_ptr + 2 * sample + 1, mask=q_mask, other=-2.0)
            attention = tl.load(weights_ptr + sample, mask=q_mask, other=0.0).to(tl.float32)
            h = y * height.to(tl.float32) - 0.5
            w = x * width.to(tl.float32) - 0.5
            inside = q_mask & (h > -1.0) & (w > -1.0) & (h < height.to(tl.float32)) & (w < width.to(tl.float32))
            h_low = tl.floor(h)
            w_low = tl.floor(w)
            lh = h - h_low
            lw = w - w_low
            hh = 1.0 - lh
            hw = 1.0 - lw
            row = tl.where(inside, h_low, -2.0).to(tl.int32)
            column = tl.where(inside, w_low, -2.0).to(tl.int32)

            offsets, valid = _corner_offsets(n, m, start, row, column, height, width, inside, value_batch_stride,
                                             heads, offs_d, d_mask, CHANNELS)
            dot_00 = _corner_backward(value_ptr, grad_value_ptr, offsets, valid, grad, attention * hh * hw)
            offsets, valid = _corner_offsets(n, m, start, row, column + 1, height, width, inside,
                                             value_batch_stride, heads, offs_d, d_mask, CHANNELS)
            dot_01 = _corner_backward(value_ptr, grad_value_ptr, offsets, valid, grad, attention * hh * lw)
            offsets, valid = _corner_offsets(n, m, start, row + 1, column, height, width, inside,
                                             value_batch_stride, heads, offs_d, d_mask, CHANNELS)
            dot_10 = _corner_backward(value_ptr, grad_value_ptr, offsets, valid, grad, attention * lh * hw)
            offsets, valid = _corner_offsets(n, m, start, row + 1, column + 1, height, width, inside,
                                             value_batch_stride, heads, offs_d, d_mask, CHANNELS)
            dot_11 = _corner_backward(value_ptr, grad_value_ptr, offsets, valid, grad, attention * lh * lw)

            grad_attention = hh * hw * dot_00 + hh * lw * dot_01 + lh * hw * dot_10 + lh * lw * dot_11
            # d/dh and d/dw of the bilinear weights; h = y * H - 0.5, so d/dy = H * d/dh (and x with W).
            grad_h = -hw * dot_00 - lw * dot_01 + hw * dot_10 + lw * dot_11
            grad_w = -hh * dot_00 + hh * dot_01 - lh * dot_10 + lh * dot_11
            grad_x = tl.where(inside, attention * grad_w * width.to(tl.float32), 0.0)
            grad_y = tl.where(inside, attention * grad_h * height.to(tl.float32), 0.0)
            tl.store(grad_weights_ptr + sample, grad_attention.to(grad_weights_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_locations_ptr + 2 * sample, grad_x, mask=q_mask)
            tl.store(grad_locations_ptr + 2 * sample + 1, grad_y, mask=q_mask)


def interpreting() -> bool:
    """True when these kernels run in Triton's Python interpreter. Triton decides when a kernel is decorated, from
    ``TRITON_INTERPRET`` at import time, so ask the kernel rather than the environment."""
    return isinstance(_msda_forward_kernel, InterpretedFunction)


# Interpreter: programs run one after another in Python, so fewer, larger tiles are much faster.
_INTERPRETER_CONFIG = {"BLOCK_Q": 64, "num_warps": 4}
_GPU_CONFIGS = [
    triton.Config({"BLOCK_Q": block_q}, num_warps=num_warps)
    for block_q in (16, 32, 64, 128)
    for num_warps in (2, 4, 8)
]


@functools.cache
def _autotuned(kernel_name: str):
    kernel = {"forward": _msda_forward_kernel, "backward": _msda_backward_kernel}[kernel_name]
    # The backward accumulates into grad_value with atomics: every trial run must start from zero.
    reset = ["grad_value_ptr"] if kernel_name == "backward" else None
    return triton.autotune(configs=_GPU_CONFIGS, key=["queries", "heads", "CHANNELS"], reset_to_zero=reset)(kernel)


def _launch_settings(kernel_name: str, batch: int, queries: int, heads: int, channels: int):
    """The one place launch settings are chosen: (kernel, grid, extra keyword arguments)."""
    block_d = triton.next_power_of_2(channels)
    if interpreting():
        kernel = {"forward": _msda_forward_kernel, "backward": _msda_backward_kernel}[kernel_name]
        block_q = _INTERPRETER_CONFIG["BLOCK_Q"]
        grid = (triton.cdiv(queries, block_q), batch * heads)
        return kernel, grid, {"BLOCK_Q": block_q, "BLOCK_D": block_d,
                              "num_warps": _INTERPRETER_CONFIG["num_warps"]}

    def grid(meta):
        return (triton.cdiv(queries, meta["BLOCK_Q"]), batch * heads)

    return _autotuned(kernel_name), grid, {"BLOCK_D": block_d}


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    if value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"Triton path takes float32, bfloat16 or float16 values, got {value.dtype}")
    if sampling_locations.dtype != torch.float32:
        raise TypeError(f"Triton path takes float32 sampling locations, got {sampling_locations.dtype}")
    if attention_weights.dtype != value.dtype:
        raise TypeError(f"attention weights must share value's dtype {value.dtype}, got {attention_weights.dtype}")
    if spatial_shapes.dtype != torch.int64 or level_start_index.dtype != torch.int64:
        raise TypeError("spatial_shapes and level_start_index must be int64")
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not interpreting() and any(t.device.type != "cuda" for t in tensors):
        raise ValueError("Triton path needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")
    if len({t.device for t in tensors}) != 1:
        raise ValueError("all inputs must be on one device")
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("Triton path needs contiguous inputs; gw_kernels.ms_deform_attn makes them contiguous")
    batch, tokens, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if sampling_locations.shape != (batch, queries, heads, levels, points, 2):
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} does not match value "
                         f"{tuple(value.shape)}")
    if attention_weights.shape != (batch, queries, heads, levels, points):
        raise ValueError(f"attention_weights {tuple(attention_weights.shape)} != "
                         f"{(batch, queries, heads, levels, points)}")
    if spatial_shapes.shape != (levels, 2) or level_start_index.shape != (levels,):
        raise ValueError(f"spatial_shapes {tuple(spatial_shapes.shape)} / level_start_index "
                         f"{tuple(level_start_index.shape)} do not match {levels} levels")
    if tokens >= 2**31:
        raise ValueError(f"value has {tokens} tokens; token indices are int32 in the kernel")


def ms_deform_attn_forward_triton(value: torch.Tensor, spatial_shapes: torch.Tensor,
                                  level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                                  attention_weights: torch.Tensor) -> torch.Tensor:
    """value (N, S, M, D) float32/bfloat16/float16; locations (N, Lq, M, L, P, 2) float32; weights
    (N, Lq, M, L, P) in value's dtype; spatial_shapes (L, 2), level_start_index (L,) int64, all contiguous on one
    device. Returns (N, Lq, M*D) in value's dtype."""
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    batch, tokens, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    output = torch.empty((batch, queries, heads * channels), dtype=value.dtype, device=value.device)
    if output.numel() == 0:
        return output
    if levels * points == 0:
        return output.zero_()
    kernel, grid, settings = _launch_settings("forward", batch, queries, heads, channels)
    kernel[grid](value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output,
                 tokens * heads * channels, queries, heads,
                 CHANNELS=channels, LEVELS=levels, POINTS=points, **settings)
    return output


def ms_deform_attn_backward_triton(grad_output: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                                   level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                                   attention_weights: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_output (N, Lq, M*D) -> (grad_value, grad_sampling_locations, grad_attention_weights), each in its
    input's dtype."""
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    batch, tokens, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    grad_output = grad_output.contiguous()
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    grad_locations = torch.zeros_like(sampling_locations)
    grad_weights = torch.zeros_like(attention_weights)
    if grad_output.numel() and levels * points:
        kernel, grid, settings = _launch_settings("backward", batch, queries, heads, channels)
        kernel[grid](grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                     grad_value, grad_locations, grad_weights, tokens * heads * channels, queries, heads,
                     CHANNELS=channels, LEVELS=levels, POINTS=points, **settings)
    return grad_value.to(value.dtype), grad_locations, grad_weights
