"""CPU backends side by side: transformers vs groundwatch torch float32 / bfloat16 vs ONNX Runtime vs OpenVINO.

One process, the same weights everywhere, every runtime on the same number of threads (``--threads``, 2: PyTorch's
``set_num_threads``, ONNX Runtime's ``intra_op_num_threads`` with one inter-op thread and no busy-waiting,
OpenVINO's ``INFERENCE_NUM_THREADS`` without CPU pinning). The contenders are called in turn inside every repeat,
with a short pause between calls so one runtime's worker threads are idle before the next starts; medians per frame
(batch 1; the prompt encoded once, except for transformers, whose API runs BERT on every call). Printed: seconds per
frame, the speed-up over groundwatch float32 and over transformers, each contender's largest difference from
groundwatch float32 on that frame, and a summary against issue 20's targets.

Models: random Swin-T OGC weights at 480x640 (the issue's figure), and the shipped default model at 320x320.
groundwatch bfloat16 is ``gdino.load(..., dtype="bfloat16")`` on the CPU: mixed precision (gdino.model.precision).

    python benchmarks/cpu_backends.py [--repeats 5] [--threads 2] [--models swint,default] [--pause 0.5]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import (PROMPT, default_pair, difference, header, interleaved, load_average,  # noqa: E402
                     median, swint_pair)

from gdino import backends, export  # noqa: E402
from gdino.model.precision import to_mixed_bfloat16  # noqa: E402

DEFAULT_PROMPT = "red circle . blue square . green triangle . yellow star ."
BASE, HF, BF16 = "groundwatch torch float32", "transformers float32", "groundwatch torch bfloat16"
EXPORTED = (("onnxruntime", "f32", "ONNX Runtime float32"), ("openvino", "f32", "OpenVINO float32"),
            ("openvino", "bf16", "OpenVINO bfloat16"))


def contenders(model, hf, height: int, width: int, prompt: str, threads: int, cache: Path) -> tuple[dict, object]:
    torch.manual_seed(1)
    images = torch.randn(1, 3, height, width)
    text = model.encode_text(prompt)
    calls = {}
    if hf is not None:
        ids = text.input_ids
        calls[HF] = lambda: hf(pixel_values=images, input_ids=ids, attention_mask=torch.ones_like(ids))
    calls[BASE] = lambda: model(images, text)
    mixed = to_mixed_bfloat16(copy.deepcopy(model))
    calls[BF16] = lambda: mixed(images, text)
    digest = export.weights_hash(model)
    for backend, precision, label in EXPORTED:
        try:
            runner = backends.open_model(model, backend, cache_dir=cache, threads=threads, precision=precision,
                                         weights_sha256=digest)
        except backends.BackendError as exc:
            print(f"  {label}: skipped ({exc})")
            continue
        calls[label] = (lambda r: lambda: r(images, text))(runner)
    return calls, text


def bench(name: str, model, hf, height: int, width: int, prompt: str, args, cache: Path) -> dict[str, float]:
    print(f"\n{name}, {height}x{width}, batch 1, {args.threads} threads, {args.repeats} interleaved repeats "
          "(preparing: bfloat16 copy, exports on first use)", flush=True)
    calls, text = contenders(model, hf, height, width, prompt, args.threads, cache)
    outputs = {}
    with torch.inference_mode():
        for label, call in calls.items():  # warm-up (and the first-use export), the outputs to compare
            out = call()
            if label == HF:
                out = type("Out", (), {"logits": out.logits[..., :text.num_tokens], "boxes": out.pred_boxes})
            outputs[label] = out
        load_before = load_average()
        times = interleaved(calls, args.repeats, args.pause)
        load_after = load_average()
    medians = {label: median(samples) for label, samples in times.items()}
    base, hf_time = medians[BASE], medians.get(HF)
    print(f"  load average {load_before:.1f} -> {load_after:.1f}")
    print(f"  {'contender':<28} {'s/frame':>8} {'vs gw fp32':>10} {'vs transformers':>16}  "
          "difference from gw fp32 (box, logit/max, queries within 1e-4)")
    for label, seconds in medians.items():
        vs_hf = f"{hf_time / seconds:.2f}x" if hf_time else "-"
        box, logit, same = difference(outputs[label], outputs[BASE])
        spread = f"{min(times[label]):.3f}-{max(times[label]):.3f}"
        print(f"  {label:<28} {seconds:8.3f} {base / seconds:9.2f}x {vs_hf:>16}  "
              f"box {box:.1e} logit {logit:.1e} same {same:.0%}   (range {spread})")
    return medians


def summary(medians: dict[str, float]) -> None:
    """Issue 20's targets on Swin-T 480x640."""
    base, hf_time = medians[BASE], medians.get(HF)
    best = min((label for label in medians if label not in (HF, BASE)), key=medians.get)
    print("\nSummary (Swin-T 480x640, issue 20's targets):")
    print(f"  fastest: {best}, {base / medians[best]:.2f}x groundwatch float32 (target >= 2x)"
          + (f", {hf_time / medians[best]:.2f}x transformers (target >= 4.5x)" if hf_time else ""))
    for label in ("ONNX Runtime float32", "OpenVINO float32"):
        if label in medians:
            ratio = base / medians[label]
            verdict = "met" if ratio >= 1.3 else "not met"
            print(f"  {label}: {ratio:.2f}x groundwatch float32 (target >= 1.3x): {verdict}")
    if BF16 in medians:
        print(f"  {BF16}: {base / medians[BF16]:.2f}x groundwatch float32")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", "--reps", type=int, default=5, help="interleaved repeats (medians)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="swint,default")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between calls (threads go idle)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    print(header(args.threads))
    swint = None
    with tempfile.TemporaryDirectory() as cache:
        for which in args.models.split(","):
            if which == "swint":
                ours, hf = swint_pair()
                swint = bench("Swin-T OGC (random weights)", ours, hf, 480, 640, PROMPT, args, Path(cache))
            elif which == "default":
                ours, hf = default_pair()
                bench("default model", ours, hf, 320, 320, DEFAULT_PROMPT, args, Path(cache))
            else:
                parser.error(f"unknown model {which!r}: swint or default")
            del ours, hf
    if swint:
        summary(swint)


if __name__ == "__main__":
    main()
