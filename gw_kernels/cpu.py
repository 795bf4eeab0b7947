"""Fast CPU multi-scale deformable attention: Numba parallel kernels for the forward and the backward.

Why Numba and not a vectorised torch gather: both were measured on the 2-core dev VM on the Swin-T encoder shape at
480x640 (``benchmarks/ms_deform_attn.py --candidates``). The gather path must materialise every corner's D channels
(Lq*M*L*P*4 rows of D values, ~420 MB in float32 for one call, so it runs in chunks) before it can weight and sum
them, while the Numba kernel reads each corner once and accumulates in place; figures are in
``docs/benchmarks.md`` ("kernels").

Layout and threading:
- forward: one parallel iteration per (batch, query); the D channels of a corner are contiguous in value
  (N, S, M, D), so the inner loop is a vectorisable axpy into the output row.
- backward: one parallel iteration per (batch, head). Each iteration owns the grad_value slice of its head, so the
  scatter-add needs no atomics and no per-thread copies; gradients for locations and weights are per sample and
  written once. With N*M below the thread count (one image, one head) the backward runs on one thread.

Processes: in a forked child the kernels run single-threaded (GNU OpenMP does not survive fork); use the "spawn"
start method to keep both cores.

Arithmetic is in the value's dtype (float32 or float64); sample coordinates are computed in float64. Inputs must
already be contiguous, on the CPU and of one dtype: ``gw_kernels.ms_deform_attn`` prepares them.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

import gw_kernels

__all__ = ["ms_deform_attn_forward_cpu", "ms_deform_attn_backward_cpu", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)

# The backward's dot products over D vectorise only if LLVM may reorder the sum (measured 37 ms -> 23 ms for the
# Swin-T encoder shape at 480x640). NaN and inf semantics stay strict.
_REDUCTION_FASTMATH = {"reassoc", "contract"}


def _forward_kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output):
    # value (N, S, M, D); sampling_locations (N, Lq, M, L, P, 2); attention_weights (N, Lq, M, L, P);
    # output (N, Lq, M, D), fully written here.
    batch, _, heads, channels = value.shape
    queries = sampling_locations.shape[1]
    levels = sampling_locations.shape[3]
    points = sampling_locations.shape[4]
    cast = value.dtype.type
    for item in numba.prange(batch * queries):
        n = item // queries
        q = item % queries
        # A private accumulator, not the output row: LLVM vectorises the channel loop only when it can prove the
        # destination does not alias value (measured 35% faster on the Swin-T encoder shape).
        accumulator = np.empty(channels, value.dtype)
        for m in range(heads):
            accumulator[:] = 0
            for level in range(levels):
                height = spatial_shapes[level, 0]
                width = spatial_shapes[level, 1]
                start = level_start_index[level]
                for p in range(points):
                    attention = attention_weights[n, q, m, level, p]
                    h = np.float64(sampling_locations[n, q, m, level, p, 1]) * height - 0.5
                    w = np.float64(sampling_locations[n, q, m, level, p, 0]) * width - 0.5
                    if not (h > -1.0 and w > -1.0 and h < height and w < width):
                        continue
                    h_low = math.floor(h)
                    w_low = math.floor(w)
                    lh = h - h_low
                    lw = w - w_low
                    hh = 1.0 - lh
                    hw = 1.0 - lw
                    h0 = np.int64(h_low)
                    w0 = np.int64(w_low)
                    # Each in-range corner is its own pass over D: reading an out-of-range corner with weight 0
                    # would turn a NaN elsewhere in value into a NaN here, which grid_sample never does.
                    if h0 >= 0 and w0 >= 0:
                        weight = cast(attention * (hh * hw))
                        index = start + h0 * width + w0
                        for d in range(channels):
                            accumulator[d] += weight * value[n, index, m, d]
                    if h0 >= 0 and w0 + 1 <= width - 1:
                        weight = cast(attention * (hh * lw))
                        index = start + h0 * width + w0 + 1
                        for d in range(channels):
                            accumulator[d] += weight * value[n, index, m, d]
                    if h0 + 1 <= height - 1 and w0 >= 0:
                        weight = cast(attention * (lh * hw))
                        index = start + (h0 + 1) * width + w0
                        for d in range(channels):
                            accumulator[d] += weight * value[n, index, m, d]
                    if h0 + 1 <= height - 1 and w0 + 1 <= width - 1:
                        weight = cast(attention * (lh * lw))
                        index = start + (h0 + 1) * width + w0 + 1
                        for d in range(channels):
                            accumulator[d] += weight * value[n, index, m, d]
            for d in range(channels):
                output[n, q, m, d] = accumulator[d]


@numba.njit(cache=True, fastmath=_REDUCTION_FASTMATH, inline="always")
def _dot(a, b):
    total = a.dtype.type(0)
    for d in range(a.shape[0]):
        total += a[d] * b[d]
    return total


@numba.njit(cache=True, fastmath=False, inline="always")
def _axpy(alpha, x, y):
    for d in range(x.shape[0]):
        y[d] += alpha * x[d]


def _backward_kernel(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                     grad_value, grad_locations, grad_weights):
    # grad_output (N, Lq, M, D); grad_value (N, S, M, D) zero on entry; grad_locations (N, Lq, M, L, P, 2) and
    # grad_weights (N, Lq, M, L, P) fully written here.
    batch, _, heads, _ = value.shape
    queries = sampling_locations.shape[1]
    levels = sampling_locations.shape[3]
    points = sampling_locations.shape[4]
    cast = value.dtype.type
    for item in numba.prange(batch * heads):
        n = item // heads
        m = item % heads
        for q in range(queries):
            grad = grad_output[n, q, m]
            for level in range(levels):
                height = spatial_shapes[level, 0]
                width = spatial_shapes[level, 1]
                start = level_start_index[level]
                for p in range(points):
                    grad_locations[n, q, m, level, p, 0] = 0
                    grad_locations[n, q, m, level, p, 1] = 0
                    grad_weights[n, q, m, level, p] = 0
                    attention = np.float64(attention_weights[n, q, m, level, p])
                    h = np.float64(sampling_locations[n, q, m, level, p, 1]) * height - 0.5
                    w = np.float64(sampling_locations[n, q, m, level, p, 0]) * width - 0.5
                    if not (h > -1.0 and w > -1.0 and h < height and w < width):
                        continue
                    h_low = math.floor(h)
                    w_low = math.floor(w)
                    lh = h - h_low
                    lw = w - w_low
                    hh = 1.0 - lh
                    hw = 1.0 - lw
                    h0 = np.int64(h_low)
                    w0 = np.int64(w_low)
                    # dot(grad, corner) per corner; a missing corner counts as a zero vector.
                    sample_grad = 0.0  # d loss / d attention = sum over corners of corner weight * dot
                    grad_h = 0.0  # d loss / d h, before the attention factor
                    grad_w = 0.0
                    if h0 >= 0 and w0 >= 0:
                        index = start + h0 * width + w0
                        dot = np.float64(_dot(grad, value[n, index, m]))
                        sample_grad += hh * hw * dot
                        grad_h -= hw * dot
                        grad_w -= hh * dot
                        _axpy(cast(attention * hh * hw), grad, grad_value[n, index, m])
                    if h0 >= 0 and w0 + 1 <= width - 1:
                        index = start + h0 * width + w0 + 1
                        dot = np.float64(_dot(grad, value[n, index, m]))
                        sample_grad += hh * lw * dot
                        grad_h -= lw * dot
                        grad_w += hh * dot
                        _axpy(cast(attention * hh * lw), grad, grad_value[n, index, m])
                    if h0 + 1 <= height - 1 and w0 >= 0:
                        index = start + (h0 + 1) * width + w0
                        dot = np.float64(_dot(grad, value[n, index, m]))
                        sample_grad += lh * hw * dot
                        grad_h += hw * dot
                        grad_w -= lh * dot
                        _axpy(cast(attention * lh * hw), grad, grad_value[n, index, m])
                    if h0 + 1 <= height - 1 and w0 + 1 <= width - 1:
                        index = start + (h0 + 1) * width + w0 + 1
                        dot = np.float64(_dot(grad, value[n, index, m]))
                        sample_grad += lh * lw * dot
                        grad_h += lw * dot
                        grad_w += lh * dot
                        _axpy(cast(attention * lh * lw), grad, grad_value[n, index, m])
                    grad_weights[n, q, m, level, p] = sample_grad
                    # h = y * H - 0.5 and w = x * W - 0.5, so d/dy = H * d/dh and d/dx = W * d/dw.
                    grad_locations[n, q, m, level, p, 0] = attention * grad_w * width
                    grad_locations[n, q, m, level, p, 1] = attention * grad_h * height


# Numba's parallel kernels run on GNU OpenMP, which does not survive fork(): in a forked child a parallel region
# hangs (parent used torch's OpenMP, measured) or the child is killed ("Terminating: fork() called from a process
# already using GNU OpenMP"). Torch drops to one thread in forked children for the same reason; so do these
# kernels: a forked child (``gw_kernels.in_forked_child``) gets single-threaded builds (compiled on first use and not cached, because Numba's cache
# key would not tell the two builds apart). Start processes with "spawn" to keep both cores.
_PARALLEL = {
    "forward": numba.njit(parallel=True, cache=True, fastmath=False)(_forward_kernel),
    "backward": numba.njit(parallel=True, cache=True, fastmath=_REDUCTION_FASTMATH)(_backward_kernel),
}
_SERIAL = {
    "forward": numba.njit(parallel=False, cache=False, fastmath=False)(_forward_kernel),
    "backward": numba.njit(parallel=False, cache=False, fastmath=_REDUCTION_FASTMATH)(_backward_kernel),
}
def _kernel(name: str):
    return _SERIAL[name] if gw_kernels.in_forked_child() else _PARALLEL[name]


def _check(*tensors: torch.Tensor) -> None:
    dtype = tensors[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"CPU path takes float32 or float64 values, got {dtype}")
    for tensor in tensors:
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.dtype != dtype:
            raise ValueError("CPU path needs contiguous CPU tensors of one dtype; call gw_kernels.ms_deform_attn")


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy()


def ms_deform_attn_forward_cpu(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                               sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """value (N, S, M, D); locations (N, Lq, M, L, P, 2) and weights (N, Lq, M, L, P) in value's dtype;
    spatial_shapes (L, 2) and level_start_index (L,) int64. Returns (N, Lq, M*D)."""
    _check(value, sampling_locations, attention_weights)
    batch, _, heads, channels = value.shape
    queries = sampling_locations.shape[1]
    output = torch.empty((batch, queries, heads, channels), dtype=value.dtype)  # (N, Lq, M, D)
    if output.numel():
        _kernel("forward")(_numpy(value), _numpy(spatial_shapes), _numpy(level_start_index),
                        _numpy(sampling_locations), _numpy(attention_weights), output.numpy())
    return output.view(batch, queries, heads * channels)  # (N, Lq, M*D)


def ms_deform_attn_backward_cpu(grad_output: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                                level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                                attention_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_output (N, Lq, M*D) -> (grad_value, grad_sampling_locations, grad_attention_weights)."""
    grad_output = grad_output.to(value.dtype).contiguous()
    _check(value, sampling_locations, attention_weights, grad_output)
    grad_value = torch.zeros_like(value)
    grad_locations = torch.zeros_like(sampling_locations)
    grad_weights = torch.zeros_like(attention_weights)
    if grad_output.numel():
        batch, queries = grad_output.shape[:2]
        heads, channels = value.shape[2:]
        _kernel("backward")(_numpy(grad_output.view(batch, queries, heads, channels)), _numpy(value),
                         _numpy(spatial_shapes), _numpy(level_start_index), _numpy(sampling_locations),
                         _numpy(attention_weights), grad_value.numpy(), grad_locations.numpy(), grad_weights.numpy())
    return grad_value, grad_locations, grad_weights
