"""Throughput of the shipped default model: frames per second at 320x320, batch 1, cached text.

groundwatch (``gdino.load("default")``, the prompt encoded once and reused) side by side with Hugging Face
``GroundingDinoForObjectDetection`` holding the same weights (converted with ``gdino.checkpoint.official_to_hf``;
it runs its text encoder on every call, which is how its API works). Prints both and the ratio.

    python3 benchmarks/default_model.py [--frames 50] [--size 320] [--threads 2] [--no-hf]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import numpy as np
import torch

PROMPT = "red circle . blue square . green triangle . yellow star ."


def load_default():
    import gdino

    return gdino.load("default")


def frames(count: int, size: int) -> list[np.ndarray]:
    from gdino.shapes import render_scene

    return [render_scene(10**12 + 777 + i, (size, size))[0] for i in range(count)]


def time_ours(model, images, warmup: int = 3) -> float:
    from gdino.train.data import normalize_image

    text = model.encode_text(PROMPT)  # cached: reused for every frame
    tensors = [normalize_image(img)[None] for img in images]
    with torch.inference_mode():
        for t in tensors[:warmup]:
            model(t, text)
        started = time.perf_counter()
        for t in tensors:
            model(t, text)
        elapsed = time.perf_counter() - started
    return len(tensors) / elapsed


def time_hf(model, images, warmup: int = 3) -> float | None:
    try:
        import transformers

        from gdino import checkpoint
        from gdino.train.data import normalize_image
    except ImportError:
        return None
    hf = transformers.GroundingDinoForObjectDetection(
        transformers.GroundingDinoConfig(**checkpoint.config_to_hf(model.config))).eval()
    missing, unexpected = hf.load_state_dict(checkpoint.official_to_hf(model.state_dict(), layout="module"),
                                             strict=False)
    if missing or unexpected:
        print(f"note: HF model: {len(missing)} missing, {len(unexpected)} unexpected keys; not compared")
        return None
    ids = model.encode_text(PROMPT).input_ids
    tensors = [normalize_image(img)[None] for img in images]
    with torch.inference_mode():
        for t in tensors[:warmup]:
            hf(pixel_values=t, input_ids=ids, attention_mask=torch.ones_like(ids))
        started = time.perf_counter()
        for t in tensors:
            hf(pixel_values=t, input_ids=ids, attention_mask=torch.ones_like(ids))
        elapsed = time.perf_counter() - started
    return len(tensors) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_default()
    images = frames(args.frames, args.size)
    ours = time_ours(model, images)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine {platform.machine()} threads {args.threads} torch {torch.__version__} commit {commit}")
    print(f"groundwatch default model, {args.size}x{args.size}, batch 1, cached text: {ours:.1f} frames/s")
    if not args.no_hf:
        theirs = time_hf(model, images)
        if theirs is not None:
            print(f"transformers GroundingDinoForObjectDetection, same weights:      {theirs:.1f} frames/s")
            print(f"ratio groundwatch / transformers: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
