"""Multi-scale deformable attention: one differentiable function, three interchangeable implementations.

``ms_deform_attn`` validates its inputs once, prepares them (contiguous, dtype) and dispatches:

- ``"reference"``: ``gw_kernels.reference``, one ``grid_sample`` per level; plain autograd; any device and dtype.
- ``"cpu"``: ``gw_kernels.cpu``, Numba parallel kernels, forward and backward. float32 and float64; float16 and
  bfloat16 values are computed in float32 and the output cast back.
- ``"triton"``: ``gw_kernels.triton_msda``, fused Triton kernels, forward and backward. float32, bfloat16 and float16
  values, float32 locations. CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``.
- ``"auto"`` (default): Triton on CUDA (the reference for float64, which the kernel does not take), the CPU path on
  the CPU, the reference anywhere else.

Non-contiguous inputs are made contiguous (one copy; the copy is differentiable), not refused: callers slice and
transpose these tensors freely and a copy is what they would write by hand. Sampling locations and attention
weights are cast to the dtype the chosen kernel needs, inside the graph, so their gradients come back in their own
dtypes.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from gw_kernels.reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "BACKENDS", "in_forked_child"]

BACKENDS = ("auto", "reference", "cpu", "triton")
_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


_process = {"forked": False}


def _note_fork_in_child() -> None:
    _process["forked"] = True


# Registered here, not in gw_kernels.cpu, because the parent imports this package (gdino does at import time) before
# it forks, while gw_kernels.cpu is often first imported in the child.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_note_fork_in_child)


def in_forked_child() -> bool:
    """True in a process forked (not spawned) after this package was imported. OpenMP thread pools do not survive
    fork, so the CPU path then runs single-threaded instead of hanging."""
    return _process["forked"]


class _MSDeformAttnFunction(torch.autograd.Function):
    """Autograd around a (forward, backward) pair of kernels; inputs already validated and prepared."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                forward_kernel: Callable, backward_kernel: Callable):
        ctx.backward_kernel = backward_kernel
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return forward_kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.backward_kernel(
            grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations,
            attention_weights)
        return grad_value, None, None, grad_locations, grad_weights, None, None


def _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    """Raises TypeError/ValueError with a readable message for any input the op cannot take."""
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    for name, tensor in zip(names, tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    for name, tensor in zip(names[3:], tensors[3:]):
        if tensor.dtype not in _FLOATING:
            raise TypeError(f"{name} must be floating point (float32/float64/float16/bfloat16), got {tensor.dtype}")
    if value.dtype not in _FLOATING:
        raise TypeError(f"value must be float32, float64, float16 or bfloat16, got {value.dtype}")
    for name, tensor in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (int64), got {tensor.dtype}")
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D), got shape {tuple(value.shape)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] == 0:
        raise ValueError(f"spatial_shapes must be (L, 2) with L >= 1, got shape {tuple(spatial_shapes.shape)}")
    levels = spatial_shapes.shape[0]
    if tuple(level_start_index.shape) != (levels,):
        raise ValueError(f"level_start_index must be ({levels},) to match spatial_shapes, got "
                         f"{tuple(level_start_index.shape)}")
    batch, tokens, heads, _ = value.shape
    if sampling_locations.dim() != 6:
        raise ValueError(f"sampling_locations must be (N, Lq, M, L, P, 2), got {tuple(sampling_locations.shape)}")
    queries, points = sampling_locations.shape[1], sampling_locations.shape[4]
    expected = (batch, queries, heads, levels, points, 2)
    if tuple(sampling_locations.shape) != expected:
        raise ValueError(f"sampling_locations shape {tuple(sampling_locations.shape)} does not match "
                         f"(N, Lq, M, L, P, 2) = {expected} from value {tuple(value.shape)} and {levels} levels")
    if tuple(attention_weights.shape) != expected[:5]:
        raise ValueError(f"attention_weights shape {tuple(attention_weights.shape)} does not match "
                         f"(N, Lq, M, L, P) = {expected[:5]}")
    devices = {t.device for t in (value, sampling_locations, attention_weights)}
    if len(devices) != 1:
        raise ValueError(f"value, sampling_locations and attention_weights must share one device, got {devices}")
    shapes = spatial_shapes.tolist()  # small; a host sync on CUDA
    if any(height < 1 or width < 1 for height, width in shapes):
        raise ValueError(f"spatial_shapes must be positive, got {shapes}")
    sizes = [height * width for height, width in shapes]
    if sum(sizes) != tokens:
        raise ValueError(f"spatial_shapes {shapes} add up to {sum(sizes)} tokens but value has S = {tokens}")
    starts = [sum(sizes[:level]) for level in range(levels)]
    if level_start_index.tolist() != starts:
        raise ValueError(f"level_start_index {level_start_index.tolist()} must be the running sum of the level "
                         f"sizes, {starts}")


def _choose_backend(backend: str, value: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if value.device.type == "cuda":
        return "reference" if value.dtype == torch.float64 else "triton"
    if value.device.type == "cpu":
        return "cpu"
    return "reference"


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                   backend: str = "auto") -> torch.Tensor:
    """Multi-scale deformable attention (Deformable DETR, Grounding DINO).

    Args:
        value: (N, S, M, D), levels concatenated in order, S = sum of H*W.
        spatial_shapes: (L, 2) int64 (H, W) per level.
        level_start_index: (L,) int64, the running sum of H*W.
        sampling_locations: (N, Lq, M, L, P, 2) x, y in [0, 1]; outside the map samples zero padding.
        attention_weights: (N, Lq, M, L, P), normally softmaxed over L*P.
        backend: "auto", "reference", "cpu" or "triton" (see the module docstring).

    Returns:
        (N, Lq, M*D) in value's dtype; differentiable in value, sampling_locations and attention_weights.

    Raises:
        TypeError: a non-tensor argument or an unsupported dtype (for the chosen backend).
        ValueError: shapes that do not fit together, spatial shapes that do not add up to S, a bad backend name,
            or tensors on a device the backend cannot use.
    """
    _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    chosen = _choose_backend(backend, value)
    spatial_shapes = spatial_shapes.to(torch.int64).contiguous()
    level_start_index = level_start_index.to(torch.int64).contiguous()

    if chosen == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights)

    if chosen == "cpu":
        from gw_kernels import cpu

        if value.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got value on {value.device}")
        compute_dtype = value.dtype if value.dtype in cpu.SUPPORTED_DTYPES else torch.float32
        output = _MSDeformAttnFunction.apply(
            value.to(compute_dtype).contiguous(), spatial_shapes, level_start_index,
            sampling_locations.to(compute_dtype).contiguous(), attention_weights.to(compute_dtype).contiguous(),
            cpu.ms_deform_attn_forward_cpu, cpu.ms_deform_attn_backward_cpu)
        return output.to(value.dtype)

    from gw_kernels import triton_msda  # imported on first use: importing Triton costs about a second

    if value.dtype not in triton_msda.SUPPORTED_DTYPES:
        raise TypeError(f"backend='triton' takes float32, bfloat16 or float16 values, got {value.dtype}; "
                        "use backend='reference' for float64")
    if value.device.type != "cuda" and not triton_msda.interpreting():
        raise ValueError(f"backend='triton' needs CUDA tensors (value is on {value.device}); set "
                         "TRITON_INTERPRET=1 to run the kernel in Triton's interpreter on the CPU")
    spatial_shapes = spatial_shapes.to(value.device)
    level_start_index = level_start_index.to(value.device)
    return _MSDeformAttnFunction.apply(
        value.contiguous(), spatial_shapes, level_start_index,
        sampling_locations.to(torch.float32).contiguous(), attention_weights.to(value.dtype).contiguous(),
        triton_msda.ms_deform_attn_forward_triton, triton_msda.ms_deform_attn_backward_triton)
