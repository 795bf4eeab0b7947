"""Where ONNX Runtime spends a frame: per-operator kernel time of the exported image graph, from ORT's profiler.

Swin-T (OGC config) with the parity tests' random weights at 480x640, batch 1, the exported float32 graph
(``gdino.export.to_onnx``), ONNX Runtime's CPU provider at full graph optimisation. Prints seconds per frame, each
op type's share and the slowest nodes.

    python3 benchmarks/ort_profile.py [--threads 1] [--runs 3] [--onnx PATH (kept and reused)]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROMPT, swint_pair  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--onnx", type=Path, default=None)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from gdino import export

    torch.set_num_threads(args.threads)
    model, _ = swint_pair(0)
    folder = Path(tempfile.mkdtemp(prefix="ortprof-"))
    path = args.onnx or folder / "swint.onnx"
    if not path.exists():
        export.to_onnx(model, path, height=480, width=640)
    feeds = export.image_inputs(torch.randn(1, 3, 480, 640), torch.ones(1, 480, 640, dtype=torch.bool),
                                model.encode_text(PROMPT))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = args.threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "ort")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    seconds = []
    for _ in range(args.runs):
        start = time.perf_counter()
        session.run(None, feeds)
        seconds.append(time.perf_counter() - start)
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op, count, by_node = collections.Counter(), collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"].get("op_name")
            by_op[op] += event["dur"]
            count[op] += 1
            by_node[(op, event["name"][:-len("_kernel_time")])] += event["dur"]
    total = sum(by_op.values())
    print(f"s/frame {', '.join(f'{s:.3f}' for s in seconds)}; kernel time {total / 1e6 / args.runs:.3f} s/frame, "
          f"{args.threads} thread(s), onnxruntime {ort.__version__}")
    for op, micros in by_op.most_common(15):
        print(f"  {op:24s} {100 * micros / total:5.1f} %  {micros / 1e3 / args.runs:8.1f} ms/frame  "
              f"{count[op] // args.runs} nodes")
    print("slowest nodes (ms/frame)")
    for (op, name), micros in by_node.most_common(10):
        print(f"  {micros / 1e3 / args.runs:8.1f}  {op}  {name}")


if __name__ == "__main__":
    main()
