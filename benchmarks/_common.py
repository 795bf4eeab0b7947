"""What the CPU model benchmarks share: the same random Swin-T weights in groundwatch and transformers, the machine's
description, interleaved timing and the output comparison.

Used by ``benchmarks/gdino_cpu.py`` (groundwatch vs transformers) and ``benchmarks/cpu_backends.py`` (every CPU
backend).
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import gdino
from gdino import config as configs
from gdino.checkpoint import config_to_hf, hf_to_official, official_to_hf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from random_weights import random_hf_model  # noqa: E402  (tests/random_weights.py: the parity tests' weights)

PROMPT = "person . car . dog . bicycle . traffic light . backpack ."


def swint_pair(seed: int = 0):
    """groundwatch's and transformers' Grounding DINO (Swin-T OGC config) with the same random weights. The fusion
    gammas and the box heads' last layers (initialised at ~0) are perturbed so those paths carry signal, as trained
    weights do."""
    cfg = configs.swint_ogc()
    hf = random_hf_model(cfg, seed)
    ours = gdino.build(cfg).eval()
    ours.load_state_dict(hf_to_official(hf.state_dict()))
    return ours, hf


def default_pair():
    """The shipped default model, and the same weights in transformers (None if they do not map)."""
    import transformers

    ours = gdino.load("default")
    hf = transformers.GroundingDinoForObjectDetection(transformers.GroundingDinoConfig(**config_to_hf(ours.config)))
    missing, unexpected = hf.load_state_dict(official_to_hf(ours.state_dict(), layout="module"), strict=False)
    return ours, (hf.eval() if not (missing or unexpected) else None)


def cpu_description() -> str:
    """'<model name>; <bf16 features>; fast bf16: <bool>' from /proc/cpuinfo and gdino.backends' probe."""
    from gdino import backends

    model = platform.processor()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = sorted({"amx_bf16", "amx_tile", "avx512_bf16", "avx512f"} & backends._cpuinfo_flags())
    return f"{model}; {', '.join(flags) or 'no bf16 features'}; fast bf16: {backends.cpu_has_fast_bfloat16()}"


def header(threads: int) -> str:
    """The lines every benchmark prints first: CPU, versions, commit, time, load."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    return (f"CPU: {cpu_description()} ({len(_cores())} cores usable)\n"
            f"torch {torch.__version__}, {threads} threads, commit {commit}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load}")


def _cores():
    try:
        import os

        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return range(1)


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def interleaved(calls: dict[str, Callable[[], object]], repeats: int, pause: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call of each contender, called in turn inside every repeat (so all see the same load).

    ``pause`` seconds between calls let one runtime's worker threads go idle before the next one starts (PyTorch's
    OpenMP and OpenVINO's TBB workers spin for a while after a parallel region)."""
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(repeats):
        for label, call in calls.items():
            if pause:
                time.sleep(pause)
            started = time.perf_counter()
            call()
            times[label].append(time.perf_counter() - started)
    return times


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def difference(out, ref) -> tuple[float, float, float]:
    """Largest box difference (normalised cxcywh), largest logit difference relative to the reference's largest
    finite logit, and the fraction of queries whose box is within 1e-4 (same selection, see the parity tests)."""
    finite = torch.isfinite(ref.logits)
    scale = max(1.0, float(ref.logits[finite].abs().max()))
    logit = float((out.logits.float()[finite] - ref.logits[finite]).abs().max()) / scale
    box_error = (out.boxes.float() - ref.boxes).abs()
    return float(box_error.max()), logit, float((box_error.amax(-1) <= 1e-4).float().mean())
