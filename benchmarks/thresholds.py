"""Recall and precision of a detector's category prompts against ``box_threshold``, on held-out shapes scenes.

The table in the default model's card (``gdino/assets/default/MODEL_CARD.md``, "Thresholds"): held-out scenes
(320x240, 1-5 objects, every present category plus ``--negatives`` absent ones per prompt), ``model.detect`` with
``remove_combined=True`` once at the lowest threshold, then each threshold keeps the detections scoring at least
it. A detection is right when its phrase is an object's category and its box overlaps an object of that category
not yet claimed by a higher-scoring detection at IoU >= 0.5. Several weights are scored on the same scenes.

    python3 benchmarks/thresholds.py [--weights default [PATH ...]] [--scenes 60]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

THRESHOLDS = (0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score_scene(boxes, scores, phrases, objects, threshold: float, wrong: dict | None = None) -> tuple[int, int, int]:
    """(right, detections kept, objects) for one scene at one threshold; counts the kind of each wrong detection
    in ``wrong`` when given: a second box on an object already found ("duplicate"), a box on an object of another
    category ("other object"), or on neither ("background": clutter, texture, a partial box)."""
    order = [i for i in np.argsort(-np.asarray(scores)) if scores[i] >= threshold]
    claimed = [False] * len(objects)
    right = 0
    for i in order:
        best, best_j = 0.5, -1
        for j, obj in enumerate(objects):
            if claimed[j] or obj.category != phrases[i]:
                continue
            overlap = iou(boxes[i], obj.box_xyxy)
            if overlap >= best:
                best, best_j = overlap, j
        if best_j >= 0:
            claimed[best_j] = True
            right += 1
        elif wrong is not None:
            same = any(o.category == phrases[i] and iou(boxes[i], o.box_xyxy) >= 0.5 for o in objects)
            other = any(o.category != phrases[i] and iou(boxes[i], o.box_xyxy) >= 0.5 for o in objects)
            kind = "duplicate" if same else "other object" if other else "background"
            wrong[kind] = wrong.get(kind, 0) + 1
    return right, len(order), len(objects)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", default=["default"])
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--negatives", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=None, help="default: EVAL_SEED_OFFSET + 424242")
    args = parser.parse_args(argv)

    import torch

    import gdino
    from gdino import shapes

    torch.set_num_threads(2)
    first = shapes.EVAL_SEED_OFFSET + 424242 if args.first_seed is None else args.first_seed
    scenes = []
    for k in range(args.scenes):
        image, objects = shapes.render_scene(first + k, (240, 320), num_objects=(1, 5))
        prompt = shapes.category_prompt(objects, first + k, num_negatives=args.negatives, split="train")
        scenes.append((image, objects, prompt.caption))
    print(f"{args.scenes} held-out scenes from seed {first}, {sum(len(s[1]) for s in scenes)} objects, "
          f"{args.negatives} absent categories per prompt")
    for weights in args.weights:
        model = gdino.load(weights)
        start = time.perf_counter()
        found = []
        with torch.inference_mode():
            for image, objects, caption in scenes:
                det = model.detect(image, caption, box_threshold=min(THRESHOLDS), remove_combined=True)
                found.append((np.asarray(det.boxes_xyxy, dtype=float).reshape(-1, 4),
                              np.asarray(det.scores, dtype=float), list(det.phrases), objects))
        row_r, row_p, row_w = [], [], []
        for threshold in THRESHOLDS:
            right = kept = total = 0
            wrong: dict[str, int] = {}
            for boxes, scores, phrases, objects in found:
                r, k, t = score_scene(boxes, scores, phrases, objects, threshold, wrong)
                right, kept, total = right + r, kept + k, total + t
            row_r.append(right / total if total else float("nan"))
            row_p.append(right / kept if kept else float("nan"))
            row_w.append("/".join(str(wrong.get(k, 0)) for k in ("duplicate", "other object", "background")))
        print(f"\nweights {weights} ({time.perf_counter() - start:.0f} s)")
        print("| box_threshold | " + " | ".join(f"{t:g}" for t in THRESHOLDS) + " |")
        print("|---|" + "---|" * len(THRESHOLDS))
        print("| recall | " + " | ".join(f"{v:.3f}" for v in row_r) + " |")
        print("| precision | " + " | ".join(f"{v:.3f}" for v in row_p) + " |")
        print("| wrong: duplicate / other object / background | " + " | ".join(row_w) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
