"""CPU backends side by side: transformers vs groundwatch torch float32 / bfloat16 vs ONNX Runtime vs OpenVINO.

One process, the same weights everywhere, the contenders called in turn inside every repetition (so all see the
same machine load); median seconds per frame (batch 1, the prompt encoded once except for transformers, whose API
runs BERT on every call), the speed-up over groundwatch float32 and over transformers, and each contender's
largest difference from groundwatch float32 on that frame (boxes, normalised; logits relative to their largest).

Models: random Swin-T OGC weights at 480x640, and the shipped default model at 320x320.

    python benchmarks/cpu_backends.py [--reps 5] [--threads 2] [--models swint,default]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import gdino
from gdino import backends, export
from gdino import config as configs
from gdino.checkpoint import config_to_hf, hf_to_official, official_to_hf

PROMPT = "person . car . dog . bicycle . traffic light . backpack ."
DEFAULT_PROMPT = "red circle . blue square . green triangle . yellow star ."


def swint_pair():
    import transformers

    torch.manual_seed(0)
    cfg = configs.swint_ogc()
    hf = transformers.GroundingDinoForObjectDetection(transformers.GroundingDinoConfig(**config_to_hf(cfg))).eval()
    with torch.no_grad():  # make the zero/1e-4-initialised paths carry signal, as trained weights do
        for name, param in hf.named_parameters():
            if name.endswith(("vision_param", "text_param")):
                param.normal_(0.0, 0.5)
            if "bbox_embed" in name and ".layers.2." in name:
                param.normal_(0.0, 0.05)
    ours = gdino.build(cfg).eval()
    ours.load_state_dict(hf_to_official(hf.state_dict()))
    return ours, hf


def default_pair():
    import transformers

    ours = gdino.load("default")
    hf = transformers.GroundingDinoForObjectDetection(transformers.GroundingDinoConfig(**config_to_hf(ours.config)))
    missing, unexpected = hf.load_state_dict(official_to_hf(ours.state_dict(), layout="module"), strict=False)
    return ours, (hf.eval() if not (missing or unexpected) else None)


def cpu_description() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = sorted({"amx_bf16", "amx_tile", "avx512_bf16", "avx512f"} & backends._cpuinfo_flags())
    return f"{model}; {', '.join(flags) or 'no bf16 features'}; fast bf16: {backends.cpu_has_fast_bfloat16()}"


def difference(out, ref) -> str:
    finite = torch.isfinite(ref.logits)
    scale = max(1.0, float(ref.logits[finite].abs().max()))
    logit = float((out.logits.float()[finite] - ref.logits[finite]).abs().max()) / scale
    box = float((out.boxes.float() - ref.boxes).abs().max())
    same = float(((out.boxes.float() - ref.boxes).abs().amax(-1) <= 1e-4).float().mean())
    return f"box {box:.1e} logit {logit:.1e} same-q {same:.0%}"


def bench(name: str, model, hf, height: int, width: int, prompt: str, reps: int, threads: int, cache: Path):
    torch.manual_seed(1)
    images = torch.randn(1, 3, height, width)
    text = model.encode_text(prompt)
    contenders = {}
    contenders["groundwatch torch float32"] = lambda: model(images, text)
    bf16 = gdino.build(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    bf16_text = bf16.encode_text(prompt)
    images_bf16 = images.bfloat16()
    contenders["groundwatch torch bfloat16"] = lambda: bf16(images_bf16, bf16_text)
    digest = export.weights_hash(model)
    for backend, precision, label in (("onnxruntime", "f32", "ONNX Runtime float32"),
                                      ("openvino", "f32", "OpenVINO float32"),
                                      ("openvino", "bf16", "OpenVINO bfloat16")):
        try:
            runner = backends.open_model(model, backend, cache_dir=cache, threads=threads, precision=precision,
                                         weights_sha256=digest)
        except backends.BackendError as exc:
            print(f"  {label}: skipped ({exc})")
            continue
        contenders[label] = (lambda r: lambda: r(images, text))(runner)
    if hf is not None:
        ids = text.input_ids
        contenders["transformers float32"] = lambda: hf(pixel_values=images, input_ids=ids,
                                                        attention_mask=torch.ones_like(ids))
    times = {label: [] for label in contenders}
    outputs = {}
    with torch.inference_mode():
        for label, call in contenders.items():  # warm-up (and the first-use export), outputs to compare
            out = call()
            if label == "transformers float32":
                out = type("Out", (), {"logits": out.logits[..., :text.num_tokens], "boxes": out.pred_boxes})
            outputs[label] = out
        for _ in range(reps):
            for label, call in contenders.items():
                started = time.perf_counter()
                call()
                times[label].append(time.perf_counter() - started)
    base = statistics.median(times["groundwatch torch float32"])
    hf_time = statistics.median(times["transformers float32"]) if "transformers float32" in times else None
    print(f"\n{name}, {height}x{width}, batch 1, {threads} threads, {reps} alternating reps")
    print(f"  {'contender':<28} {'s/frame':>8} {'vs gw fp32':>10} {'vs transformers':>16}  difference from gw fp32")
    for label, samples in times.items():
        median = statistics.median(samples)
        vs_hf = f"{hf_time / median:.2f}x" if hf_time else "-"
        print(f"  {label:<28} {median:8.3f} {base / median:9.2f}x {vs_hf:>16}  "
              f"{difference(outputs[label], outputs['groundwatch torch float32'])}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="swint,default")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"CPU: {cpu_description()}")
    print(f"torch {torch.__version__}, commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory() as cache:
        for which in args.models.split(","):
            if which == "swint":
                ours, hf = swint_pair()
                bench("Swin-T OGC (random weights)", ours, hf, 480, 640, PROMPT, args.reps, args.threads, Path(cache))
            elif which == "default":
                ours, hf = default_pair()
                bench("default model", ours, hf, 320, 320, DEFAULT_PROMPT, args.reps, args.threads, Path(cache))
            del ours, hf


if __name__ == "__main__":
    main()
