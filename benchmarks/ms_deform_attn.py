"""Multi-scale deformable attention: grid_sample reference vs the CPU path (and Triton on CUDA), side by side.

Grounding DINO Swin-T shapes (M=8 heads, D=32, L=4 levels, P=4 points, N=1) at 480x640 and 800x1333, encoder
(Lq = S) and decoder (Lq = 900) calls, forward and forward+backward. Prints the median time in microseconds, the
effective bandwidth and the speed-up over the float32 reference on the same device.

Effective bandwidth counts each tensor once, the traffic an ideal kernel would have: forward = value + locations +
weights + output; forward+backward adds grad_output, value, locations and weights read again and the three
gradients written.

    python3 benchmarks/ms_deform_attn.py                 # all shapes
    python3 benchmarks/ms_deform_attn.py --candidates    # also the rejected torch-gather CPU candidate
    python3 benchmarks/ms_deform_attn.py --shapes encoder-480x640 --repeats 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gw_kernels import ms_deform_attn  # noqa: E402

LEVELS = {
    "480x640": [(60, 80), (30, 40), (15, 20), (8, 10)],
    "800x1333": [(100, 167), (50, 84), (25, 42), (13, 21)],
}
HEADS, CHANNELS, POINTS, DECODER_QUERIES = 8, 32, 4, 900


def problem(resolution: str, call: str, device: str, seed: int = 0):
    shapes = LEVELS[resolution]
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    tokens = int(sizes.sum())
    queries = tokens if call == "encoder" else DECODER_QUERIES
    levels = len(shapes)
    value = torch.randn(1, tokens, HEADS, CHANNELS, generator=generator)  # (N, S, M, D)
    # Sampling locations as the model makes them: a reference point plus small offsets, a few beyond the edges.
    reference_points = torch.rand(1, queries, 1, 1, 1, 2, generator=generator)
    offsets = torch.randn(1, queries, HEADS, levels, POINTS, 2, generator=generator) * 0.05
    locations = reference_points + offsets  # (N, Lq, M, L, P, 2)
    weights = torch.randn(1, queries, HEADS, levels * POINTS, generator=generator).softmax(-1)
    weights = weights.view(1, queries, HEADS, levels, POINTS)  # (N, Lq, M, L, P)
    return [t.to(device) for t in (value, spatial_shapes, level_start_index, locations, weights)]


def gather_candidate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                     chunk: int = 1024):
    """The rejected CPU candidate: vectorised torch gather of the four corners, differentiable by autograd.
    Gathers Lq*M*L*P rows of D channels per corner, in chunks of queries to bound memory."""
    batch, tokens, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    rows = value.permute(0, 2, 1, 3).reshape(batch * heads * tokens, channels)  # (N*M*S, D)
    height = spatial_shapes[:, 0].to(value.dtype).view(1, 1, 1, levels, 1)
    width = spatial_shapes[:, 1].to(value.dtype).view(1, 1, 1, levels, 1)
    start = level_start_index.view(1, 1, 1, levels, 1)
    head_base = (torch.arange(batch).view(batch, 1, 1, 1, 1) * heads
                 + torch.arange(heads).view(1, 1, heads, 1, 1)) * tokens
    outputs = []
    for begin in range(0, queries, chunk):
        locations = sampling_locations[:, begin:begin + chunk]  # (N, q, M, L, P, 2)
        weights = attention_weights[:, begin:begin + chunk]  # (N, q, M, L, P)
        x = locations[..., 0] * width - 0.5
        y = locations[..., 1] * height - 0.5
        x_low, y_low = x.floor(), y.floor()
        lx, ly = x - x_low, y - y_low
        output = 0
        for dy in (0, 1):
            for dx in (0, 1):
                column, row = x_low + dx, y_low + dy
                valid = (column >= 0) & (column <= width - 1) & (row >= 0) & (row <= height - 1)
                corner_weight = (lx if dx else 1 - lx) * (ly if dy else 1 - ly) * weights * valid
                index = start + row.clamp(min=0).long() * spatial_shapes[:, 1].view(1, 1, 1, levels, 1) \
                    + column.clamp(min=0).long()
                index = (head_base + index.clamp(max=tokens - 1)).flatten()
                corners = rows[index].view(*corner_weight.shape[:3], levels * points, channels)
                weighted = corner_weight.flatten(3).unsqueeze(-2) @ corners  # (N, q, M, 1, D)
                output = output + weighted.squeeze(-2)
        outputs.append(output.flatten(2))  # (N, q, M*D)
    return torch.cat(outputs, dim=1)


def run(function, inputs, backward: bool):
    leaves = [t.detach().requires_grad_(backward) for t in (inputs[0], inputs[3], inputs[4])]
    output = function(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2])
    if backward:
        output.backward(torch.ones_like(output))
    return output


def time_interleaved(entries, backward: bool, repeats: int, device: str) -> list[float]:
    """Median wall time in microseconds per (function, inputs) entry. One warm-up call each (compiles, autotunes),
    then ``repeats`` rounds that call every entry once: on a shared machine, load that comes and goes then hits
    every competitor alike instead of whichever happened to be running."""
    for function, inputs in entries:
        run(function, inputs, backward)
    times = [[] for _ in entries]
    for _ in range(repeats):
        for slot, (function, inputs) in enumerate(entries):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(function, inputs, backward)
            if device == "cuda":
                torch.cuda.synchronize()
            times[slot].append(time.perf_counter() - start)
    return [statistics.median(slot_times) * 1e6 for slot_times in times]


def traffic_bytes(inputs, backward: bool) -> int:
    value, _, _, locations, weights = inputs
    output = value.shape[0] * locations.shape[1] * value.shape[2] * value.shape[3] * value.element_size()
    forward = value.nbytes + locations.nbytes + weights.nbytes + output
    return forward * 2 + value.nbytes + locations.nbytes + weights.nbytes if backward else forward


def implementations(device: str, candidates: bool):
    """(name, dtype, function) per competitor; the first is the float32 reference the ratios refer to."""
    def backend(name):
        return lambda *args: ms_deform_attn(*args, backend=name)

    found = [("reference", torch.float32, backend("reference"))]
    if device == "cpu":
        found.append(("cpu (numba)", torch.float32, backend("cpu")))
        if candidates:
            found.append(("torch gather (rejected)", torch.float32, gather_candidate))
    else:
        found.append(("triton", torch.float32, backend("triton")))
        found.append(("triton", torch.bfloat16, backend("triton")))
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="*", default=None,
                        help="any of encoder-480x640 decoder-480x640 encoder-800x1333 decoder-800x1333")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per entry (median reported)")
    parser.add_argument("--candidates", action="store_true", help="also time the rejected torch-gather candidate")
    parser.add_argument("--forward-only", action="store_true")
    args = parser.parse_args(argv)
    device = args.device
    repeats = args.repeats or (50 if device == "cuda" else 5)
    names = args.shapes or [f"{call}-{resolution}" for resolution in LEVELS for call in ("encoder", "decoder")]
    load = f" load={os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"# device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()} repeats={repeats} (median, interleaved){load}")
    print(f"{'shape':<17} {'pass':<8} {'implementation':<24} {'dtype':<9} {'us':>12} {'GB/s':>8} {'vs ref':>7} "
          f"{'max |diff|':>10}")
    for name in names:
        call, resolution = name.split("-")
        base = problem(resolution, call, device)
        modes = [False] if args.forward_only else [False, True]
        for backward in modes:
            competitors = implementations(device, args.candidates)
            entries = []
            for _, dtype, function in competitors:
                # locations (index 3) stay float32; value and weights take the competitor's dtype
                inputs = [t.to(dtype) if t.is_floating_point() and index != 3 else t
                          for index, t in enumerate(base)]
                entries.append((function, inputs))
            elapsed = time_interleaved(entries, backward, repeats, device)
            with torch.no_grad():
                reference_output = entries[0][0](*entries[0][1]).float()
            for (label, dtype, function), (_, inputs), microseconds in zip(competitors, entries, elapsed):
                with torch.no_grad():
                    difference = (function(*inputs).float() - reference_output).abs().max().item()
                gigabytes = traffic_bytes(inputs, backward) / microseconds / 1e3
                print(f"{name:<17} {'fwd+bwd' if backward else 'fwd':<8} {label:<24} {str(dtype)[6:]:<9} "
                      f"{microseconds:>12.0f} {gigabytes:>8.2f} {elapsed[0] / microseconds:>6.1f}x "
                      f"{difference:>10.2e}", flush=True)
    if hasattr(os, "getloadavg"):
        print(f"# load average at the end: {os.getloadavg()[0]:.1f} (1 min)")

if __name__ == "__main__":
    main()
