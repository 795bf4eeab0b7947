"""Evaluation: detection, grounding and tracking metrics on hand-built inputs, box conversions, and the tracker
scored on shapes-video ground truth. No model needed."""

import numpy as np
import pytest
import torch

from gdino import shapes
from gdino.boxes import cxcywh_to_xyxy, from_pixels_xyxy, iou_matrix, to_pixels_xyxy, xyxy_to_cxcywh
from gdino.evaluate import ImageDetections, ImageTruth, coco_ap, phrase_scores, referring_accuracy
from tracker.evaluation import score_videos, tracking_metrics


def test_box_conversions_round_trip_and_scale():
    boxes_cxcywh = torch.tensor([[0.5, 0.25, 0.2, 0.1], [0.1, 0.9, 0.0, 0.0]])
    torch.testing.assert_close(xyxy_to_cxcywh(cxcywh_to_xyxy(boxes_cxcywh)), boxes_cxcywh)
    pixels = to_pixels_xyxy(boxes_cxcywh, height=100, width=200)
    torch.testing.assert_close(pixels[0], torch.tensor([80.0, 20.0, 120.0, 30.0]))
    torch.testing.assert_close(from_pixels_xyxy(pixels.numpy(), 100, 200), boxes_cxcywh)
    assert iou_matrix(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)
    assert iou_matrix([[3, 3, 3, 3]], [[3, 3, 3, 3]])[0, 0] == 0.0  # an empty union is 0, never NaN


def test_phrase_scores_average_the_phrase_tokens():
    logits = torch.tensor([[0.0, 10.0, -10.0, 0.0]])
    offsets = [(0, 0), (0, 3), (4, 10), (0, 0)]
    scores = phrase_scores(logits, offsets, [(0, 10)])
    assert scores.shape == (1, 1) and scores.item() == pytest.approx(0.5, abs=1e-3)


def test_coco_ap_perfect_and_shifted():
    truth = [ImageTruth(np.array([[10, 10, 50, 50], [60, 60, 90, 100]], np.float32), ["a", "b"], 128, 128)]
    perfect = [ImageDetections(truth[0].boxes_xyxy.copy(), np.array([0.9, 0.8]), ["a", "b"])]
    assert coco_ap(truth, perfect)["AP"] == pytest.approx(1.0)
    wrong_label = [ImageDetections(truth[0].boxes_xyxy.copy(), np.array([0.9, 0.8]), ["b", "a"])]
    assert coco_ap(truth, wrong_label)["AP50"] == pytest.approx(0.0)
    shifted = [ImageDetections(truth[0].boxes_xyxy + 6, np.array([0.9, 0.8]), ["a", "b"])]
    r = coco_ap(truth, shifted)
    assert r["AP50"] == pytest.approx(1.0) and r["AP"] < 0.9


def test_referring_accuracy_and_iou():
    assert iou_matrix([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0, 0] == pytest.approx(1 / 3)
    acc = referring_accuracy([np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10]])],
                             [np.array([[1, 1, 10, 10]]), np.array([[20, 20, 30, 30]])])
    assert acc == 0.5


def test_tracking_metrics_count_switches_misses_and_false_positives():
    b1, b2 = np.array([[0, 0, 10, 10]]), np.array([[50, 50, 60, 60]])
    truth_boxes = [np.concatenate([b1, b2])] * 4
    truth_ids = [np.array([1, 2])] * 4
    perfect = tracking_metrics(truth_boxes, truth_ids, truth_boxes, [np.array([7, 8])] * 4)
    assert perfect["MOTA"] == 1.0 and perfect["IDF1"] == 1.0
    # the hypothesis for object 1 changes id half way, object 2 is missed in one frame, one false positive
    hyp_boxes = [np.concatenate([b1, b2]), np.concatenate([b1, b2]), np.concatenate([b1, b2 * 3]),
                 np.concatenate([b1, b2])]
    hyp_ids = [np.array([7, 8]), np.array([7, 8]), np.array([9, 8]), np.array([9, 8])]
    r = tracking_metrics(truth_boxes, truth_ids, hyp_boxes, hyp_ids)
    assert (r["IDSW"], r["FN"], r["FP"]) == (1, 1, 1)
    assert r["MOTA"] == pytest.approx(1 - 3 / 8)
    assert r["IDF1"] == pytest.approx(2 * 5 / 16)


def test_tracker_on_ground_truth_boxes_scores_high():
    """The tracker fed the shapes videos' true boxes (as `groundwatch eval` feeds it the detector's) keeps
    near-perfect MOTA/IDF1; ids of two videos never mix."""
    videos = []
    for index in range(2):
        _, truths = shapes.render_video(shapes.EVAL_SEED_OFFSET + 5 + index, 40, (120, 160), fps=10)
        detections = [(t.boxes_xyxy, np.full(len(t.phrases), 0.9), list(t.categories)) for t in truths]
        videos.append((detections, [(t.track_ids + index * 100_000, t.boxes_xyxy) for t in truths]))
    report = score_videos(videos)
    assert report["MOTA"] > 0.8 and report["IDF1"] > 0.8, report
    # Detections missing on every third frame must show as misses: the figure can fail.
    gappy = [([(b, s, l) if i % 3 else (b[:0], s[:0], []) for i, (b, s, l) in enumerate(d)], t) for d, t in videos]
    assert score_videos(gappy)["MOTA"] < report["MOTA"] - 0.1


def test_gdino_does_not_import_the_tracker_or_the_streamer():
    """Imports go downhill: gdino/evaluate.py used to import the tracker package for its tracking metrics."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for package, forbidden in (("gdino", ("tracker", "streamer")), ("tracker", ("gdino", "streamer")),
                               ("gw_kernels", ("gdino", "tracker", "streamer"))):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert offenders == []


def test_partial_category_prompts_leave_unnamed_objects_untargeted():
    """Stage 3's prompts always named every present category, so a lone "red star ." fired on the orange star
    beside it; ``partial`` prompts name some (or none) of them, and the unnamed objects must not be targets."""
    from gdino import world

    sizes = []
    for seed in range(60):
        scene = world.render(seed, (128, 128))
        present = {o.category for o in scene.objects}
        prompt = shapes.category_prompt(scene.objects, np.random.default_rng(seed), num_negatives=(0, 3),
                                        hard_negatives=0.6, partial=1.0)
        named = {p for p, positive in zip(prompt.phrases, prompt.positives) if positive}
        assert named <= present and len(named) <= 2
        for obj, k in zip(scene.objects, prompt.object_phrase):
            assert (k >= 0) == (obj.category in named)
            if k >= 0:
                assert prompt.phrases[k] == obj.category
        negatives = [p for p, positive in zip(prompt.phrases, prompt.positives) if not positive]
        assert not present.intersection(negatives)
        sizes.append(len(named))
    assert {0, 1, 2} <= set(sizes)
    full = shapes.category_prompt(scene.objects, np.random.default_rng(0), num_negatives=(0, 3))
    assert all(k >= 0 for k in full.object_phrase)


def test_single_phrase_evaluation_counts_wrong_objects_and_lookalike_alarms(monkeypatch):
    """The single-phrase figures must separate a detector that fires on every object from one that fires only on
    the named category (the failure stage 3 had), with the predictions replaced by those two oracles."""
    from gdino import evaluate

    named, lookalikes = evaluate.world_single_phrase_set(30, 0, 128, ("plain",))
    assert len(named) == 30 and len(lookalikes) >= 20
    for _, objects, prompt in lookalikes:
        phrase = prompt.phrases[0]
        present = {o.category for o in objects}
        assert phrase not in present
        assert any(phrase.split()[0] == c.split()[0] or phrase.split()[-1] == c.split()[-1] for c in present)

    def oracle(everything):
        def predict(model, images, prompts, top_k=100, batch_size=8):
            out = []
            for image, prompt in zip(images, prompts):
                objects = next(o for im, o, p in named + lookalikes if p is prompt)
                chosen = [o for o, k in zip(objects, prompt.object_phrase) if everything or k == 0]
                boxes = np.array([o.box_xyxy for o in chosen], np.float32).reshape(-1, 4)
                scores = np.full(len(boxes), 0.9, np.float32)
                if not len(boxes):
                    boxes, scores = np.zeros((1, 4), np.float32), np.array([0.01], np.float32)
                out.append((boxes, scores, np.zeros(len(boxes), np.int64)))
            return out
        return predict

    monkeypatch.setattr(evaluate, "predict", oracle(False))
    good = evaluate.evaluate_single_phrase(None, named, lookalikes)
    monkeypatch.setattr(evaluate, "predict", oracle(True))
    bad = evaluate.evaluate_single_phrase(None, named, lookalikes)
    assert good["AP"] > 0.99 and good["wrong_object_rate"] == 0 and good["lookalike_false_alarm_rate"] == 0
    assert bad["lookalike_false_alarm_rate"] == 1.0
    crowded = sum(any(k != 0 for k in p.object_phrase) for _, _, p in named) / len(named)
    assert bad["wrong_object_rate"] == pytest.approx(crowded) and crowded > 0.5
