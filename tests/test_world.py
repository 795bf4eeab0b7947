"""The wide shapes world (gdino.world): held-out families and templates stay out of training, expressions name
what they say, scenes are reproducible."""

import numpy as np
import pytest

from gdino import shapes, world
from gdino.evaluate import world_detection_set, world_referring_set
from gdino.train.data import ShapesDataset

# Words that only the held-out templates and synonyms use.
HELD_OUT_WORDS = (" that is ", "to the left of", "on the right of", "bigger", "littler", "highest", "lowest",
                  " dot", " block", " hoop", "plus sign", "tiny", "huge", "turquoise")


def test_training_never_sees_held_out_backgrounds_or_templates():
    dataset = ShapesDataset(seed=11, image_size=96, world="wide", referring=0.7, hard_negatives=0.6)
    backgrounds, templates = set(), set()
    for index in range(60):
        sample = dataset[index]
        backgrounds.add(sample.meta["background"])
        templates.update(sample.meta.get("templates", []))
        assert not any(word in sample.caption for word in HELD_OUT_WORDS), sample.caption
        for spans in sample.target.spans:  # every target's span is a phrase of the caption
            for start, end in spans:
                assert 0 <= start < end <= len(sample.caption)
    assert backgrounds <= set(world.TRAIN_BACKGROUNDS) and len(backgrounds) >= 3, backgrounds
    assert templates <= set(world.TRAIN_TEMPLATES + world.PLURAL_TEMPLATES) and len(templates) >= 5, templates


def test_template_weights_shift_the_mix_and_reject_unknown_or_held_out_templates():
    """Stage 5 spends more steps on position words: a template weighted up is drawn more often, one weighted 0 never,
    and a held-out template (or a typo) cannot be asked for."""
    def counts(weights):
        dataset = ShapesDataset(seed=3, image_size=96, world="wide", referring=1.0, template_weights=weights)
        found: dict[str, int] = {}
        for index in range(80):
            for template in dataset[index].meta.get("templates", []):
                found[template] = found.get(template, 0) + 1
        return found

    uniform = counts(None)
    weighted = counts({"top_bottom": 8.0, "plural": 0.0})
    share = lambda found: found.get("top_bottom", 0) / sum(found.values())  # noqa: E731
    assert share(weighted) > 2 * share(uniform) and share(weighted) > 0.25, (uniform, weighted)
    assert uniform.get("plural", 0) > 0 and weighted.get("plural", 0) == 0, (uniform, weighted)
    for bad in ({"superlative_position": 2.0}, {"top_botom": 2.0}, {"top_bottom": -1.0}):
        with pytest.raises(ValueError, match="template_weights"):
            ShapesDataset(world="wide", template_weights=bad)


def test_training_families_can_be_chosen_but_never_a_held_out_one():
    """``[data] backgrounds`` picks the families a run trains on (stages 3-5 name the first four, so they reproduce);
    the default draws from every training family, the two added ones included; a held-out family is refused."""
    chosen = ShapesDataset(seed=2, image_size=64, world="wide", backgrounds=("stripes", "bokeh"))
    assert {chosen[i].meta["background"] for i in range(16)} == {"stripes", "bokeh"}
    first = ShapesDataset(seed=2, image_size=64, world="wide", backgrounds=world.FIRST_TRAIN_BACKGROUNDS)
    assert {first[i].meta["background"] for i in range(30)} <= set(world.FIRST_TRAIN_BACKGROUNDS)
    default = ShapesDataset(seed=2, image_size=64, world="wide")
    found = {default[i].meta["background"] for i in range(40)}
    assert {"stripes", "bokeh"} <= found and found <= set(world.TRAIN_BACKGROUNDS), found
    for bad in (("marble",), ("texture", "patchwork"), ("photo",), ()):
        with pytest.raises(ValueError, match="backgrounds"):
            ShapesDataset(world="wide", backgrounds=bad)


def test_held_out_sets_use_only_held_out_backgrounds():
    items = world_detection_set(4, 0, 96, tuple(sorted(world.HELD_OUT_BACKGROUNDS)))
    assert len(items) == 4 and all(len(objects) >= 1 for _, objects, _ in items)
    for family in world.BACKGROUNDS:
        image = world.background(np.random.default_rng(0), family, 40, 50)
        assert image.shape == (40, 50, 3) and image.dtype == np.uint8 and image.flags.c_contiguous
    with pytest.raises(ValueError, match="unknown background"):
        world.background(np.random.default_rng(0), "photo", 10, 10)


def test_render_is_a_pure_function_of_the_seed():
    a = world.render(5, (96, 96))
    b = world.render(5, (96, 96))
    assert np.array_equal(a.image, b.image) and [o.box_xyxy for o in a.objects] == [o.box_xyxy for o in b.objects]
    assert not np.array_equal(a.image, world.render(6, (96, 96)).image)


def _objects(*specs):
    """Objects from (colour, shape, size, x1, y1, x2, y2)."""
    return [shapes.ShapeObject(shape, colour, size, (x1, y1, x2, y2)) for colour, shape, size, x1, y1, x2, y2 in specs]


def test_relations_and_comparisons_name_the_right_object():
    objects = _objects(
        ("red", "star", "small", 0, 40, 10, 50),     # left of the ring
        ("blue", "ring", "medium", 40, 40, 60, 60),
        ("red", "star", "large", 80, 10, 110, 40),   # right of the ring, higher up
    )
    rng = np.random.default_rng(0)
    texts = {e.text: e.targets for t in world.TEMPLATES for e in world.candidates(objects, t, rng, 120)}
    assert texts["the red star left of the blue ring"] == (0,)
    assert texts["the red star to the left of the blue ring"] == (0,)
    assert texts["the red star right of the blue ring"] == (2,)
    assert texts["the larger of the two red stars"] == (2,)
    assert texts["the littler red star"] == (0,)
    assert texts["the star nearest the top"] == (2,)
    assert texts["the lowest star"] == (0,)
    assert texts["the red stars"] == (0, 2)
    # "the red star" alone is ambiguous here, so no colour-shape expression names a star.
    assert "the red star" not in texts and "the blue ring" in texts


def test_caption_spans_cover_each_expression_without_its_article():
    objects = _objects(("red", "star", "small", 0, 0, 10, 10), ("blue", "ring", "medium", 40, 40, 60, 60))
    rng = np.random.default_rng(0)
    first = world.candidates(objects, "full", rng, 64)[0]
    second = world.candidates(objects, "bare", rng, 64)[1]
    prompt = world.caption([first, second])
    assert prompt.caption == "the small red star . blue ring ."
    assert [prompt.caption[a:b] for a, b in prompt.spans] == ["small red star", "blue ring"]


def test_referring_sets_have_one_referent_per_expression():
    items = world_referring_set(3, 0, 96, "larger_smaller", world.TRAIN_BACKGROUNDS)
    assert len(items) == 3
    for _, objects, prompt in items:
        assert prompt.object_phrase.count(0) == 1 and len(prompt.object_phrase) == len(objects)
        assert prompt.caption.startswith(("the larger of the two", "the smaller of the two"))
