"""The shapes world: determinism, ground truth that matches the pixels, prompts and the compositional split."""

import numpy as np
import pytest

from gdino import shapes


def test_scene_is_a_pure_function_of_its_seed():
    a_img, a_objs = shapes.render_scene(11, (128, 160))
    b_img, b_objs = shapes.render_scene(11, (128, 160))
    c_img, _ = shapes.render_scene(12, (128, 160))
    assert a_img.shape == (128, 160, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img)
    assert [o.to_dict() for o in a_objs] == [o.to_dict() for o in b_objs]
    assert not np.array_equal(a_img, c_img)


def test_vocabulary_size():
    assert len(shapes.SHAPES) >= 6 and len(shapes.COLOURS) >= 8
    assert set(shapes.SIZES) == {"small", "medium", "large"}


@pytest.mark.parametrize("seed", range(5))
def test_boxes_cover_the_drawn_colour(seed):
    """Each box holds pixels of its object's colour, and they touch all four sides of the box."""
    img, objs = shapes.render_scene(seed, (192, 192), clutter=0.0, max_overlap=0.0)
    assert objs
    for o in objs:
        x1, y1, x2, y2 = o.box_xyxy
        assert 0 <= x1 < x2 <= 192 and 0 <= y1 < y2 <= 192
        crop = img[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))].astype(int)
        target = np.array(shapes.COLOURS[o.colour])
        close = np.abs(crop - target).max(-1) < 40
        assert close.mean() > 0.15, o.phrase
        rows, cols = np.nonzero(close)
        height, width = close.shape
        assert rows.min() <= 2 and rows.max() >= height - 3, o.phrase
        assert cols.min() <= 2 and cols.max() >= width - 3, o.phrase


def test_size_classes_do_not_overlap():
    side = 200
    for i in range(30):
        _, objs = shapes.render_scene(i, (side, side))
        for o in objs:
            lo, hi = shapes.SIZES[o.size]
            assert lo * side <= o.extent <= hi * side


def test_category_prompt_spans_and_negatives():
    _, objs = shapes.render_scene(3, (256, 256))
    prompt = shapes.category_prompt(objs, 0, num_negatives=3)
    assert prompt.caption.endswith(" .")
    for phrase, (start, end) in zip(prompt.phrases, prompt.spans):
        assert prompt.caption[start:end] == phrase
    present = {o.category for o in objs}
    assert sum(prompt.positives) == len(present)
    assert len(prompt.phrases) == len(present) + 3
    for o, index in zip(objs, prompt.object_phrase):
        assert prompt.phrases[index] == o.category


def test_referring_prompt_picks_a_unique_object():
    for seed in range(20):
        img, objs, prompt = shapes.referring_scene(seed, (256, 256))
        assert prompt.caption.startswith("the ")
        targets = [i for i, p in enumerate(prompt.object_phrase) if p == 0]
        assert len(targets) == 1
        target = objs[targets[0]]
        assert prompt.caption == "the " + target.phrase
        assert sum(o.phrase == target.phrase for o in objs) == 1
        start, end = prompt.spans[0]
        assert prompt.caption[start:end] == target.phrase


def test_describe_uses_the_shortest_unique_description():
    O = shapes.ShapeObject
    objs = [O("triangle", "green", "large", (0, 0, 1, 1)), O("triangle", "green", "small", (0, 0, 1, 1)),
            O("circle", "red", "small", (0, 0, 1, 1))]
    assert shapes.describe(objs, 0) == "the large triangle"
    assert shapes.describe(objs, 2) == "the circle"


def test_compositional_split_never_shows_held_out_pairs_in_training():
    held = {f"{c} {s}" for c, s in shapes.HELD_OUT_PAIRS}
    assert held.isdisjoint(shapes.categories("train"))
    assert set(shapes.categories("compositional")) == held
    # every colour and every shape is still seen in training
    train = shapes.categories("train")
    assert {c.split()[0] for c in train} == set(shapes.COLOURS)
    assert {c.split()[1] for c in train} == set(shapes.SHAPES)
    for seed in range(40):
        _, objs = shapes.render_scene(seed, (96, 96))
        prompt = shapes.category_prompt(objs, seed, num_negatives=5)
        assert held.isdisjoint({o.category for o in objs})
        assert held.isdisjoint(prompt.phrases)
        _, objs = shapes.render_scene(seed, (96, 96), split="compositional")
        assert {o.category for o in objs} <= held


def test_hard_negatives_are_look_alikes_of_present_objects():
    held = {f"{c} {s}" for c, s in shapes.HELD_OUT_PAIRS}
    lookalike_share = []
    for seed in range(40):
        _, objs = shapes.render_scene(seed, (96, 96), num_objects=(1, 2))
        present = {o.category for o in objs}
        colours = {c.split()[0] for c in present}
        kinds = {c.split()[1] for c in present}
        for hard in (0.0, 1.0):
            prompt = shapes.category_prompt(objs, seed, num_negatives=4, hard_negatives=hard)
            negatives = [p for p, positive in zip(prompt.phrases, prompt.positives) if not positive]
            assert len(negatives) == len(set(negatives)) == 4
            assert present.isdisjoint(negatives) and held.isdisjoint(negatives)
            assert set(prompt.phrases) - set(negatives) == present
            share = np.mean([n.split()[0] in colours or n.split()[1] in kinds for n in negatives])
            if hard == 1.0:
                assert share == 1.0, (present, negatives)
            else:
                lookalike_share.append(share)
    # Random negatives are look-alikes far less often: the option changes what the prompts teach.
    assert np.mean(lookalike_share) < 0.6
    # Off by default: the held-out sets' prompts are unchanged.
    _, objs = shapes.render_scene(7, (96, 96))
    assert shapes.category_prompt(objs, 7) == shapes.category_prompt(objs, 7, hard_negatives=0.0)


def test_video_ground_truth():
    frames, truths = shapes.render_video(4, 40, (120, 160), fps=10)
    again, _ = shapes.render_video(4, 40, (120, 160), fps=10)
    assert frames.shape == (40, 120, 160, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, again)
    assert len(truths) == 40
    seen: dict[int, str] = {}
    for t in truths:
        n = len(t.track_ids)
        assert t.boxes_xyxy.shape == (n, 4) and len(t.phrases) == n and len(t.categories) == n
        assert len(set(t.track_ids.tolist())) == n
        assert np.all(t.boxes_xyxy[:, 2] > t.boxes_xyxy[:, 0]) and np.all(t.boxes_xyxy[:, 3] > t.boxes_xyxy[:, 1])
        assert np.all(t.boxes_xyxy >= 0) and np.all(t.boxes_xyxy[:, [0, 2]] <= 160)
        assert np.all((t.visibility > 0) & (t.visibility <= 1))
        for track_id, phrase in zip(t.track_ids.tolist(), t.phrases):
            assert seen.setdefault(track_id, phrase) == phrase  # a track keeps its identity


def test_videos_have_entries_exits_and_occlusion():
    entered = left = occluded = 0
    for seed in range(4):
        _, truths = shapes.render_video(seed, 80, (120, 160), fps=10)
        ids = [set(t.track_ids.tolist()) for t in truths]
        entered += sum(len(b - a) for a, b in zip(ids, ids[1:]))
        left += sum(len(a - b) for a, b in zip(ids, ids[1:]))
        occluded += sum(int(np.any(t.visibility < 0.7)) for t in truths)
    assert entered > 0 and left > 0 and occluded > 0


def test_video_moves_objects():
    _, truths = shapes.render_video(2, 10, (120, 160), fps=10)
    first = {i: b for i, b in zip(truths[0].track_ids.tolist(), truths[0].boxes_xyxy)}
    last = {i: b for i, b in zip(truths[-1].track_ids.tolist(), truths[-1].boxes_xyxy)}
    common = set(first) & set(last)
    assert common and any(np.abs(first[i] - last[i]).max() > 2 for i in common)
