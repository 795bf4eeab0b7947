"""Detection, grounding and tracking metrics, and their evaluation on the shapes world.

- ``coco_ap``: COCO AP / AP50 / AP75 with pycocotools on in-memory ground truth and detections.
- ``referring_accuracy``: top-1 box of a referring expression is correct when IoU >= 0.5.
- ``tracking_sets``: the detector's output on held-out shapes videos, for ``tracker.evaluation`` to score a
  tracker on (MOTA/IDF1 live there: gdino does not import the tracker).
- ``evaluate_shapes``: runs a model over seeded held-out shapes sets (seeds never used in training) and
  reports all of the above.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from gdino import shapes
from gdino.boxes import iou_matrix, to_pixels_xyxy
from gdino.processing import normalize

# ---------------------------------------------------------------------------------------------------------------
# Scores per phrase


def phrase_scores(logits: torch.Tensor, offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
                  ) -> torch.Tensor:
    """(Q, T) raw logits -> (Q, P) score per query and phrase: the mean token probability over the phrase's
    tokens (tokens whose char span overlaps the phrase span)."""
    probs = logits.float().sigmoid()
    num_tokens = probs.shape[-1]
    columns = []
    for start, end in spans:
        tokens = [t for t, (a, b) in enumerate(offsets[:num_tokens]) if b > a and a < end and b > start]
        if not tokens:
            columns.append(torch.zeros(probs.shape[0]))
            continue
        columns.append(probs[:, tokens].mean(-1))
    return torch.stack(columns, -1) if columns else probs.new_zeros(probs.shape[0], 0)




# ---------------------------------------------------------------------------------------------------------------
# COCO AP


@dataclass
class ImageDetections:
    boxes_xyxy: np.ndarray  # (N, 4) pixels
    scores: np.ndarray  # (N,)
    labels: list[str]


@dataclass
class ImageTruth:
    boxes_xyxy: np.ndarray  # (N, 4) pixels
    labels: list[str]
    height: int
    width: int


def coco_ap(truths: Sequence[ImageTruth], detections: Sequence[ImageDetections]) -> dict[str, float]:
    """COCO-style AP (IoU 0.50:0.95), AP50, AP75 and AP90 with pycocotools; categories are the label strings.

    Boxes are COCO boxes in xyxy form (pixel i spans [i, i + 1)); AP90 shows whether boxes are right to the
    pixel, which AP50 cannot."""
    # pycocotools is imported on use: only the COCO metric needs it.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = sorted({l for t in truths for l in t.labels} | {l for d in detections for l in d.labels})
    category_id = {n: i + 1 for i, n in enumerate(names)}
    images, annotations, results = [], [], []
    for image_id, (truth, det) in enumerate(zip(truths, detections), start=1):
        images.append({"id": image_id, "height": truth.height, "width": truth.width})
        for box, label in zip(np.asarray(truth.boxes_xyxy).reshape(-1, 4), truth.labels):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id[label],
                                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
        for box, score, label in zip(np.asarray(det.boxes_xyxy).reshape(-1, 4), det.scores, det.labels):
            results.append({"image_id": image_id, "category_id": category_id[label], "score": float(score),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    if not annotations:
        return {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan"), "AP90": float("nan")}
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": i, "name": n} for n, i in category_id.items()]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not results:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AP90": 0.0}
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.maxDets = [1, 10, 100]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    # precision: (IoU thresholds, recall points, categories, area ranges, max detections); -1 where undefined.
    thresholds = np.asarray(evaluator.params.iouThrs)
    at_90 = evaluator.eval["precision"][int(np.argmin(np.abs(thresholds - 0.9))), :, :, 0, -1]
    ap90 = float(at_90[at_90 > -1].mean()) if (at_90 > -1).any() else float("nan")
    return {"AP": float(stats[0]), "AP50": float(stats[1]), "AP75": float(stats[2]), "AP90": ap90}


def referring_accuracy(predicted_xyxy: Sequence[np.ndarray], target_xyxy: Sequence[np.ndarray],
                       threshold: float = 0.5) -> float:
    """Fraction of expressions whose top-1 box has IoU >= ``threshold`` with the referent."""
    if not predicted_xyxy:
        return float("nan")
    hits = [float(iou_matrix(p, t)[0, 0]) >= threshold for p, t in zip(predicted_xyxy, target_xyxy)]
    return float(np.mean(hits))


# ---------------------------------------------------------------------------------------------------------------
# Running a model on the shapes world


def _normalize(images: Sequence[np.ndarray]) -> torch.Tensor:
    """Same-size uint8 RGB (H, W, 3) images -> (B, 3, H, W) normalised, at their own size (no resize)."""
    return torch.stack([normalize(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)) for img in images])


@torch.no_grad()
def predict(model, images: Sequence[np.ndarray], prompts: Sequence[shapes.Prompt], top_k: int = 100,
            batch_size: int = 8) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image: the ``top_k`` (query, phrase) pairs by score: boxes (K, 4) pixels xyxy, scores (K,),
    phrase indices (K,)."""
    device = next(model.parameters()).device
    out_list = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        chunk_prompts = prompts[start:start + batch_size]
        batch = _normalize(chunk).to(device)
        out = model(batch, [p.caption for p in chunk_prompts])
        for i, prompt in enumerate(chunk_prompts):
            height, width = chunk[i].shape[:2]
            scores = phrase_scores(out.logits[i].cpu(), out.text.offsets[i], prompt.spans)  # (Q, P)
            flat = scores.flatten()
            k = min(top_k, flat.numel())
            values, index = flat.topk(k)
            query = index // scores.shape[1]
            phrase = index % scores.shape[1]
            boxes_xyxy = to_pixels_xyxy(out.boxes[i, query].float().cpu(), height, width).numpy()
            boxes = np.clip(boxes_xyxy, 0, [width, height, width, height]).astype(np.float32)
            out_list.append((boxes, values.numpy(), phrase.numpy()))
    return out_list


def detection_set(num_images: int, seed: int, image_size: int, split: str = "all") -> list:
    """A held-out category-list set: scenes of ``split`` with present categories plus negatives as prompt.
    Seeds are at or above ``shapes.EVAL_SEED_OFFSET``, never used in training."""
    items = []
    for i in range(num_images):
        scene_seed = shapes.EVAL_SEED_OFFSET + seed * 100_003 + i
        image, objects = shapes.render_scene(scene_seed, (image_size, image_size), split=split)
        negatives_split = "all" if split == "compositional" else split
        prompt = shapes.category_prompt(objects, np.random.default_rng([scene_seed, 3]), num_negatives=(2, 4),
                                        split=negatives_split)
        items.append((image, objects, prompt))
    return items


def referring_set(num_images: int, seed: int, image_size: int, split: str = "train") -> list:
    items = []
    for i in range(num_images):
        scene_seed = shapes.EVAL_SEED_OFFSET + seed * 100_003 + 50_000 + i
        items.append(shapes.referring_scene(scene_seed, (image_size, image_size), split=split))
    return items


def evaluate_detection(model, items, batch_size: int = 8) -> dict[str, float]:
    predictions = predict(model, [im for im, _, _ in items], [p for _, _, p in items], batch_size=batch_size)
    truths, dets = [], []
    for (image, objects, prompt), (boxes, scores, phrase) in zip(items, predictions):
        height, width = image.shape[:2]
        truths.append(ImageTruth(np.array([o.box_xyxy for o in objects], np.float32).reshape(-1, 4),
                                 [o.category for o in objects], height, width))
        dets.append(ImageDetections(boxes, scores, [prompt.phrases[j] for j in phrase]))
    return coco_ap(truths, dets)


def evaluate_referring(model, items, batch_size: int = 8) -> dict[str, float]:
    predictions = predict(model, [im for im, _, _ in items], [p for _, _, p in items], top_k=1,
                          batch_size=batch_size)
    predicted, targets = [], []
    for (image, objects, prompt), (boxes, _, _) in zip(items, predictions):
        target = objects[prompt.object_phrase.index(0)]
        predicted.append(boxes[:1])
        targets.append(np.array([target.box_xyxy], np.float32))
    return {"accuracy": referring_accuracy(predicted, targets)}


def tracking_sets(model, num_videos: int = 2, num_frames: int = 40, seed: int = 0, size=(256, 256),
                  score_threshold: float = 0.1) -> list[tuple[list, list]]:
    """The detector on held-out shapes videos, ready for a tracker to be scored on (``tracker.evaluation``).

    Per video: (detections, truths); detections per frame (boxes_xyxy (N, 4) pixels, scores (N,), phrases),
    after per-phrase NMS at ``score_threshold``; truths per frame (track ids (M,), boxes_xyxy (M, 4)). Ids of
    video ``v`` are offset by ``v * 100_000`` so that videos never share one. Nothing here runs a tracker: gdino
    does not depend on the tracker package."""
    videos = []
    for v in range(num_videos):
        video_seed = shapes.EVAL_SEED_OFFSET + seed * 100_003 + 90_000 + v
        frames, truths = shapes.render_video(video_seed, num_frames, size, fps=10)
        names = sorted({c for t in truths for c in t.categories})
        prompt = shapes.fixed_category_prompt(names, [])
        predictions = predict(model, list(frames), [prompt] * len(frames), top_k=100)
        detections = []
        for boxes, scores, phrase in predictions:
            keep = _nms_per_label(boxes, scores, phrase, score_threshold)
            detections.append((boxes[keep], scores[keep], [prompt.phrases[j] for j in phrase[keep]]))
        videos.append((detections, [(t.track_ids + v * 100_000, t.boxes_xyxy) for t in truths]))
    return videos


def _nms_per_label(boxes, scores, labels, threshold: float, iou: float = 0.5) -> np.ndarray:
    from torchvision.ops import batched_nms  # torchvision is imported on use: only evaluation needs NMS

    keep = np.nonzero(scores >= threshold)[0]
    if not len(keep):
        return keep
    kept = batched_nms(torch.as_tensor(boxes[keep]), torch.as_tensor(scores[keep]),
                       torch.as_tensor(labels[keep].astype(np.int64)), iou).numpy()
    return keep[kept]


def evaluate_shapes(model, num_images: int = 200, seed: int = 0, image_size: int = 256,
                    referring_images: int | None = None, tracking_videos: int = 0, batch_size: int = 8,
                    score_tracking: Callable[[list], dict] | None = None) -> dict[str, dict]:
    """Every shapes-world metric of ``model`` on held-out seeds: category-list AP on the training pairs
    (``held_out``), on the held-out colour-shape pairs (``compositional``), referring accuracy, and (when
    ``tracking_videos`` and a ``score_tracking`` are given, e.g. ``tracker.evaluation.score_videos``) MOTA/IDF1
    of a tracker on the detector's output."""
    was_training = model.training
    model.eval()
    started = time.time()
    report: dict[str, dict] = {}
    report["held_out"] = evaluate_detection(model, detection_set(num_images, seed, image_size, "train"),
                                            batch_size)
    report["compositional"] = evaluate_detection(
        model, detection_set(num_images, seed + 1, image_size, "compositional"), batch_size)
    report["referring"] = evaluate_referring(
        model, referring_set(referring_images or num_images, seed, image_size, "train"), batch_size)
    if tracking_videos and score_tracking is not None:
        report["tracking"] = score_tracking(tracking_sets(model, tracking_videos, seed=seed,
                                                          size=(image_size, image_size)))
    report["meta"] = {"num_images": num_images, "seed": seed, "image_size": image_size,
                      "seconds": round(time.time() - started, 1)}
    model.train(was_training)
    return report


# ---------------------------------------------------------------------------------------------------------------
# The wide world (gdino.world): in-distribution vs held-out background families, per phrase template


def world_detection_set(num_images: int, seed: int, image_size: int, backgrounds: Sequence[str]) -> list:
    """Held-out wide-world scenes (seeds >= ``shapes.EVAL_SEED_OFFSET``) on ``backgrounds``, with category-list
    prompts (present categories plus 2-4 absent ones)."""
    from gdino import world

    items = []
    for i in range(num_images):
        scene_seed = shapes.EVAL_SEED_OFFSET + seed * 100_003 + 60_000 + i
        scene = world.render(scene_seed, (image_size, image_size), backgrounds=tuple(backgrounds))
        prompt = shapes.category_prompt(scene.objects, np.random.default_rng([scene_seed, 3]), num_negatives=(2, 4),
                                        split="train")
        items.append((scene.image, scene.objects, prompt))
    return items


def world_referring_set(num_images: int, seed: int, image_size: int, template: str, backgrounds: Sequence[str]
                        ) -> list:
    """``num_images`` held-out scenes, each with one expression of ``template`` naming exactly one object; as
    (image, objects, prompt) with the referent as ``prompt.object_phrase``'s 0. Scenes where the template
    names nothing are skipped (twins are frequent, so relations and comparisons find a referent)."""
    from gdino import world

    items = []
    index = 0
    while len(items) < num_images and index < num_images * 40:
        scene_seed = shapes.EVAL_SEED_OFFSET + seed * 100_003 + 70_000 + (world.TEMPLATES.index(template) * 5_000) \
            + index
        index += 1
        scene = world.render(scene_seed, (image_size, image_size), backgrounds=tuple(backgrounds), twins=0.8)
        rng = np.random.default_rng([scene_seed, 5])
        options = [e for e in world.candidates(scene.objects, template, rng, image_size) if len(e.targets) == 1]
        if not options:
            continue
        expression = options[int(rng.integers(len(options)))]
        prompt = world.caption([expression])
        prompt.object_phrase = [0 if k == expression.targets[0] else -1 for k in range(len(scene.objects))]
        items.append((scene.image, scene.objects, prompt))
    return items


def world_single_phrase_set(num_images: int, seed: int, image_size: int, backgrounds: Sequence[str]
                            ) -> tuple[list, list]:
    """Prompts of one phrase, as a user writes them ("red star ."), on held-out wide-world scenes: per scene, one
    present category alone (``named``) and one absent look-alike alone (``lookalikes``: the shape of a present
    object in another colour, or its colour on another shape), as (image, objects, prompt) items."""
    from gdino import world

    named, lookalikes = [], []
    for i in range(num_images):
        scene_seed = shapes.EVAL_SEED_OFFSET + seed * 100_003 + 80_000 + i
        scene = world.render(scene_seed, (image_size, image_size), backgrounds=tuple(backgrounds))
        rng = np.random.default_rng([scene_seed, 7])
        present = sorted({o.category for o in scene.objects})
        if not present:
            continue
        named.append((scene.image, scene.objects,
                      shapes.fixed_category_prompt([present[int(rng.integers(len(present)))]], scene.objects)))
        colours = {c.split()[0] for c in present}
        kinds = {c.split()[-1] for c in present}
        similar = [c for c in shapes.categories("train")
                   if c not in present and (c.split()[0] in colours or c.split()[-1] in kinds)]
        if similar:
            lookalikes.append((scene.image, scene.objects,
                               shapes.fixed_category_prompt([similar[int(rng.integers(len(similar)))]], scene.objects)))
    return named, lookalikes


def evaluate_single_phrase(model, named, lookalikes, batch_size: int = 8, threshold: float = 0.35
                           ) -> dict[str, float]:
    """Single-phrase prompts: AP of the named category alone; ``wrong_object_rate``, the fraction of named
    prompts with a detection at ``threshold`` (the detector's default box threshold) that overlaps no object of
    that category (IoU < 0.5: it fired on another object); ``lookalike_false_alarm_rate``, the fraction of
    absent look-alike prompts with any detection at ``threshold``."""
    predictions = predict(model, [im for im, _, _ in named], [p for _, _, p in named], batch_size=batch_size)
    truths, dets, wrong = [], [], 0
    for (image, objects, prompt), (boxes, scores, _) in zip(named, predictions):
        height, width = image.shape[:2]
        mine = np.array([o.box_xyxy for o, k in zip(objects, prompt.object_phrase) if k == 0],
                        np.float32).reshape(-1, 4)
        truths.append(ImageTruth(mine, [prompt.phrases[0]] * len(mine), height, width))
        dets.append(ImageDetections(boxes, scores, [prompt.phrases[0]] * len(boxes)))
        strong = boxes[scores >= threshold]
        if len(strong) and (not len(mine) or (iou_matrix(strong, mine).max(axis=1) < 0.5).any()):
            wrong += 1
    report = coco_ap(truths, dets)
    report["wrong_object_rate"] = wrong / max(1, len(named))
    alarms = predict(model, [im for im, _, _ in lookalikes], [p for _, _, p in lookalikes], top_k=1,
                     batch_size=batch_size)
    report["lookalike_false_alarm_rate"] = (sum(float(s[0]) >= threshold for _, s, _ in alarms)
                                            / max(1, len(lookalikes)))
    report["images"] = len(named)
    return report


def evaluate_world(model, num_images: int = 100, referring_images: int = 40, seed: int = 0, image_size: int = 192,
                   batch_size: int = 8) -> dict[str, dict]:
    """Wide-world figures side by side: category-list AP/AP50/AP75/AP90, single-phrase prompts
    (``evaluate_single_phrase``) and referring top-1 per phrase template, on the training background families
    (``in_distribution``) and on the held-out ones (``held_out``)."""
    from gdino import world

    was_training = model.training
    model.eval()
    started = time.time()
    families = {"in_distribution": world.TRAIN_BACKGROUNDS, "held_out": tuple(sorted(world.HELD_OUT_BACKGROUNDS))}
    report: dict[str, dict] = {"detection": {}, "referring": {}}
    for name, backgrounds in families.items():
        report["detection"][name] = evaluate_detection(
            model, world_detection_set(num_images, seed, image_size, backgrounds), batch_size)
        report.setdefault("single_phrase", {})[name] = evaluate_single_phrase(
            model, *world_single_phrase_set(num_images, seed, image_size, backgrounds), batch_size)
    for template in world.TRAIN_TEMPLATES + world.HELD_OUT_TEMPLATES:
        row = {"held_out_template": template in world.HELD_OUT_TEMPLATES}
        for name, backgrounds in families.items():
            items = world_referring_set(referring_images, seed, image_size, template, backgrounds)
            row[name] = evaluate_referring(model, items, batch_size)["accuracy"] if items else float("nan")
            row[f"{name}_images"] = len(items)
        report["referring"][template] = row
    report["meta"] = {"num_images": num_images, "referring_images": referring_images, "seed": seed,
                      "image_size": image_size, "seconds": round(time.time() - started, 1)}
    model.train(was_training)
    return report


def format_world_report(report: dict) -> str:
    """The wide-world report as two Markdown tables (the model card's layout)."""
    lines = ["| backgrounds | AP | AP50 | AP75 | AP90 |", "|---|---|---|---|---|"]
    for name, row in report["detection"].items():
        lines.append(f"| {name} | {row['AP']:.3f} | {row['AP50']:.3f} | {row['AP75']:.3f} | {row['AP90']:.3f} |")
    if "single_phrase" in report:
        lines += ["", "| backgrounds | single phrase AP | AP50 | fires on another object | fires on an absent look-alike |",
                  "|---|---|---|---|---|"]
        for name, row in report["single_phrase"].items():
            lines.append(f"| {name} | {row['AP']:.3f} | {row['AP50']:.3f} | {row['wrong_object_rate']:.1%} | "
                         f"{row['lookalike_false_alarm_rate']:.1%} |")
    lines += ["", "| phrase template | held-out template | top-1, training backgrounds | top-1, held-out backgrounds |",
              "|---|---|---|---|"]
    for template, row in report["referring"].items():
        lines.append(f"| {template} | {'yes' if row['held_out_template'] else 'no'} | "
                     f"{row['in_distribution']:.3f} ({row['in_distribution_images']}) | "
                     f"{row['held_out']:.3f} ({row['held_out_images']}) |")
    return "\n".join(lines)
