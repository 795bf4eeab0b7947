"""groundwatch's Grounding DINO vs transformers' GroundingDinoForObjectDetection, same random weights, on the CPU.

Swin-T OGC config, a fixed 6-phrase prompt, 480x640 and 800x1333. The two models run alternately in one process
(so both see the same machine load); per-frame latency medians, their ratio and the output differences are
printed. groundwatch encodes the prompt once (the daemon's per-stream cache); transformers runs BERT every call,
as its processor-then-model usage does.

    python benchmarks/gdino_cpu.py [--reps 3] [--sizes 480x640,800x1333] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import PROMPT, header, median, swint_pair  # noqa: E402


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sizes", default="480x640,800x1333")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(header(args.threads))
    ours, hf = swint_pair()
    text = ours.encode_text(PROMPT)
    input_ids = text.input_ids
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, prompt {PROMPT!r} ({input_ids.shape[1]} "
          "tokens), Swin-T OGC random weights, float32")
    print(f"{'size':>10} {'groundwatch s/frame':>20} {'transformers s/frame':>21} {'speed-up':>9} "
          f"{'max |dlogit|':>13} {'max |dbox|':>11} {'same top-k':>11} {'|dlogit| same':>14} {'|dbox| same':>12}")
    for size in args.sizes.split(","):
        height, width = (int(v) for v in size.split("x"))
        torch.manual_seed(1)
        images = torch.randn(1, 3, height, width)
        ids = input_ids.expand(1, -1)

        def run_ours():
            return ours(images, text)

        def run_hf():
            return hf(pixel_values=images, input_ids=ids, attention_mask=torch.ones_like(ids))

        with torch.inference_mode():
            mine, ref = run_ours(), run_hf()  # warm-up, and the outputs to compare
            ours_times, hf_times = [], []
            for _ in range(args.reps):
                ours_times.append(time_call(run_ours))
                hf_times.append(time_call(run_hf))
        num_tokens = input_ids.shape[1]
        ref_logits = ref.logits[..., :num_tokens]
        finite = torch.isfinite(ref_logits)
        logit_diff = (mine.logits[finite] - ref_logits[finite]).abs().max().item()
        box_diff = (mine.boxes - ref.pred_boxes).abs().max().item()
        ref_top = ref.enc_outputs_class.max(-1)[0].topk(ours.config.num_queries)[1]
        same = ref_top == mine.encoder_output["indices"]  # (1, Q): the same candidate at the same rank
        same_top = same.float().mean().item()
        # Near-tied selection scores can swap ranks in float32 (see tests/test_gdino_parity.py); the queries whose
        # selection agrees are compared separately.
        logit_same = torch.where(finite, (mine.logits - ref_logits).abs(), 0).amax(-1)[same].max().item()
        box_same = (mine.boxes - ref.pred_boxes).abs().amax(-1)[same].max().item()
        ours_median, hf_median = median(ours_times), median(hf_times)
        print(f"{size:>10} {ours_median:20.3f} {hf_median:21.3f} {hf_median / ours_median:8.2f}x "
              f"{logit_diff:13.2e} {box_diff:11.2e} {same_top:10.1%} {logit_same:14.2e} {box_same:12.2e}")


if __name__ == "__main__":
    main()
