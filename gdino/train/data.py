"""Training data: the shapes world (generated on the fly from seeds), COCO json and ODVG jsonl.

Every dataset yields ``Sample``s: an RGB uint8 image, a caption and a ``Target`` (boxes cxcywh in [0, 1] of the
image, and per object the char spans of its phrase in the caption). ``collate`` turns samples into a batch:
normalised images padded to a common size with a pixel mask, captions, targets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from gdino import shapes
from gdino.boxes import from_pixels_xyxy
from gdino.processing import normalize
from gdino.train.targets import Target



@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    caption: str
    target: Target
    phrases: list[str] = field(default_factory=list)  # phrase of each object (for logs / evaluation)
    meta: dict = field(default_factory=dict)


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 normalised as for inference (``gdino.processing.normalize``)."""
    return normalize(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) normalised, zero-padded
    pixel_mask: torch.Tensor  # (B, H, W) bool, True on real pixels
    captions: list[str]
    targets: list[Target]
    samples: list[Sample]

    @property
    def padded(self) -> bool:
        return not bool(self.pixel_mask.all())


def collate(samples: Sequence[Sample]) -> Batch:
    height = max(s.image.shape[0] for s in samples)
    width = max(s.image.shape[1] for s in samples)
    images = torch.zeros(len(samples), 3, height, width)
    mask = torch.zeros(len(samples), height, width, dtype=torch.bool)
    targets = []
    for i, s in enumerate(samples):
        h, w = s.image.shape[:2]
        images[i, :, :h, :w] = normalize_image(s.image)
        mask[i, :h, :w] = True
        targets.append(s.target)
    return Batch(images, mask, [s.caption for s in samples], targets, list(samples))


# ---------------------------------------------------------------------------------------------------------------
# Shapes world


class ShapesDataset:
    """Scenes of the shapes world, sample ``i`` a pure function of (seed, i).

    A fraction ``referring`` of samples are referring-expression scenes ("the large green triangle", only the
    referent is a target); the rest are category-list scenes with every present category plus absent ones as
    negatives (``hard_negatives``: the fraction of those that are look-alikes of a present object; ``partial``: the
    fraction of category prompts naming only some of the present categories, see ``shapes.category_prompt``).
    ``template_weights`` (wide world): relative sampling weights of the training phrase templates, by name (missing
    ones weigh 1), to spend more steps on the hard ones (position and relations); ``backgrounds`` (wide world): the
    background families drawn from (default ``world.TRAIN_BACKGROUNDS``; a held-out family is refused). ``clutter`` and ``max_objects``
    can be changed between steps (the curriculum).
    Training seeds stay below ``shapes.EVAL_SEED_OFFSET``; held-out sets pass ``held_out=True``.
    """

    def __init__(self, seed: int = 0, image_size: int = 256, split: str = "train", referring: float = 0.25,
                 clutter: float = 1.0, max_objects: int = 6, num_negatives: tuple[int, int] = (1, 5),
                 held_out: bool = False, length: int = 10**9, hard_negatives: float = 0.0, world: str = "classic",
                 partial: float = 0.0, template_weights: dict[str, float] | None = None,
                 backgrounds: Sequence[str] | None = None):
        if world not in ("classic", "wide"):
            raise ValueError(f"world={world!r}: expected 'classic' (gdino.shapes) or 'wide' (gdino.world)")
        self.world = world
        self.seed = seed
        self.image_size = image_size
        self.split = split
        self.referring = referring
        self.clutter = clutter
        self.max_objects = max_objects
        self.num_negatives = num_negatives
        self.hard_negatives = hard_negatives
        self.partial = partial
        self.template_weights = dict(template_weights or {})
        if self.template_weights:
            from gdino import world as world_module

            known = world_module.TRAIN_TEMPLATES + world_module.PLURAL_TEMPLATES
            unknown = sorted(set(self.template_weights) - set(known))
            if unknown:
                raise ValueError(f"template_weights: unknown training templates {unknown}; known: {list(known)}")
            if any(w < 0 for w in self.template_weights.values()) or not any(
                    self.template_weights.get(t, 1.0) > 0 for t in known):
                raise ValueError("template_weights: weights must be >= 0 and not all zero")
        self.backgrounds: tuple[str, ...] | None = None
        if backgrounds is not None:
            from gdino import world as world_module

            self.backgrounds = tuple(backgrounds)
            wrong = sorted(set(self.backgrounds) - set(world_module.TRAIN_BACKGROUNDS))
            if wrong or not self.backgrounds:
                raise ValueError(f"backgrounds: {wrong or 'none'} not training families; training families: "
                                 f"{list(world_module.TRAIN_BACKGROUNDS)} (held out: "
                                 f"{sorted(world_module.HELD_OUT_BACKGROUNDS)})")
        self.held_out = held_out
        self.length = length

    def __len__(self) -> int:
        return self.length

    def scene_seed(self, index: int) -> int:
        base = (self.seed * 1_000_003 + index) % shapes.EVAL_SEED_OFFSET
        return base + shapes.EVAL_SEED_OFFSET if self.held_out else base

    def __getitem__(self, index: int) -> Sample:
        seed = self.scene_seed(index)
        rng = np.random.default_rng([seed, 17])
        size = (self.image_size, self.image_size)
        if self.world == "wide":
            return self._wide_sample(seed, rng, size)
        if rng.uniform() < self.referring:
            image, objects, prompt = shapes.referring_scene(seed, size, split=self.split, clutter=self.clutter)
            kind = "referring"
        else:
            image, objects = shapes.render_scene(seed, size, split=self.split, clutter=self.clutter,
                                                 num_objects=(1, self.max_objects))
            prompt = shapes.category_prompt(objects, rng, num_negatives=self.num_negatives, split=self.split,
                                            hard_negatives=self.hard_negatives, partial=self.partial)
            kind = "category"
        return shapes_sample(image, objects, prompt, meta={"seed": seed, "kind": kind})


    def _wide_sample(self, seed: int, rng: np.random.Generator, size: tuple[int, int]) -> Sample:
        """A wide-world scene (``gdino.world``, training background families only) with either a category-list
        prompt or one to three referring expressions of the training templates, naming disjoint objects."""
        from gdino import world

        scene = world.render(seed, size, backgrounds=self.backgrounds or world.TRAIN_BACKGROUNDS, split=self.split,
                             clutter=self.clutter, num_objects=(1, self.max_objects))
        meta = {"seed": seed, "background": scene.background}
        if rng.uniform() < self.referring:
            chosen: list[world.Expression] = []
            taken: set[int] = set()
            templates = world.TRAIN_TEMPLATES + world.PLURAL_TEMPLATES
            weights = None  # uniform, drawn as before weights existed (earlier stages' configs stay reproducible)
            if self.template_weights:
                weights = np.array([self.template_weights.get(t, 1.0) for t in templates], np.float64)
                weights /= weights.sum()
            for _ in range(int(rng.integers(1, 4))):
                for _attempt in range(4):
                    pick = rng.integers(len(templates)) if weights is None else rng.choice(len(templates), p=weights)
                    template = templates[int(pick)]
                    options = [e for e in world.candidates(scene.objects, template, rng, min(size))
                               if not taken.intersection(e.targets)]
                    if options:
                        expression = options[int(rng.integers(len(options)))]
                        chosen.append(expression)
                        taken.update(expression.targets)
                        break
            if chosen:
                prompt = world.caption(chosen)
                keep = sorted(taken)
                boxes = np.array([scene.objects[i].box_xyxy for i in keep], np.float32).reshape(-1, 4)
                phrase_of = {i: k for k, e in enumerate(chosen) for i in e.targets}
                target = Target(from_pixels_xyxy(boxes, *size), [[prompt.spans[phrase_of[i]]] for i in keep])
                return Sample(scene.image, prompt.caption, target, [prompt.phrases[phrase_of[i]] for i in keep],
                              dict(meta, kind="expressions", templates=[e.template for e in chosen],
                                   objects=scene.objects))
        prompt = shapes.category_prompt(scene.objects, rng, num_negatives=self.num_negatives, split=self.split,
                                        hard_negatives=self.hard_negatives, partial=self.partial)
        return shapes_sample(scene.image, scene.objects, prompt, meta=dict(meta, kind="category"))


def shapes_sample(image: np.ndarray, objects, prompt: shapes.Prompt, meta: dict | None = None) -> Sample:
    keep = [i for i, p in enumerate(prompt.object_phrase) if p >= 0]
    height, width = image.shape[:2]
    boxes = np.array([objects[i].box_xyxy for i in keep], np.float32).reshape(-1, 4)
    spans = [[prompt.spans[prompt.object_phrase[i]]] for i in keep]
    target = Target(from_pixels_xyxy(boxes, height, width), spans)
    phrases = [prompt.phrases[prompt.object_phrase[i]] for i in keep]
    return Sample(image, prompt.caption, target, phrases, dict(meta or {}, prompt=prompt, objects=objects))


# ---------------------------------------------------------------------------------------------------------------
# User data: COCO json and ODVG jsonl


def resize_to(image: np.ndarray, boxes_xyxy: np.ndarray, size: int, max_size: int | None = None):
    """Resize so the shorter side is ``size`` (the longer at most ``max_size``); boxes scale with it."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    new_w, new_h = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return resized, np.asarray(boxes_xyxy, np.float32).reshape(-1, 4) * np.array(
        [new_w / width, new_h / height, new_w / width, new_h / height], np.float32)


def read_rgb(path: str | Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def detection_caption(names_present: Sequence[str], names_all: Sequence[str], rng: np.random.Generator,
                      max_phrases: int = 40) -> tuple[str, dict[str, tuple[int, int]]]:
    """" . ".join(shuffled present + negative names) + " ." with the span of each name."""
    present = list(dict.fromkeys(names_present))
    absent = [n for n in dict.fromkeys(names_all) if n not in set(present)]
    room = max(0, max_phrases - len(present))
    negatives = [absent[i] for i in rng.permutation(len(absent))[:room]] if absent else []
    phrases = present + negatives
    phrases = [phrases[i] for i in rng.permutation(len(phrases))]
    caption, spans = shapes._join(phrases)
    return caption, dict(zip(phrases, spans))


class CocoDataset:
    """A COCO-format detection set; category names become the prompt (present ones plus negatives)."""

    def __init__(self, annotations: str | Path, image_root: str | Path, image_size: int = 512,
                 max_size: int = 853, seed: int = 0, max_phrases: int = 40):
        data = json.loads(Path(annotations).read_text())
        self.image_root = Path(image_root)
        self.image_size = image_size
        self.max_size = max_size
        self.seed = seed
        self.max_phrases = max_phrases
        self.names = {c["id"]: c["name"].lower().strip() for c in data["categories"]}
        self.images = sorted(data["images"], key=lambda im: im["id"])
        self.by_image: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in data.get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            self.by_image.setdefault(ann["image_id"], []).append(ann)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        info = self.images[index % len(self.images)]
        rng = np.random.default_rng([self.seed, index])
        image = read_rgb(self.image_root / info["file_name"])
        anns = [a for a in self.by_image.get(info["id"], []) if a["bbox"][2] > 1 and a["bbox"][3] > 1]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], np.float32).reshape(-1, 4)
        labels = [self.names[a["category_id"]] for a in anns]
        image, boxes = resize_to(image, boxes, self.image_size, self.max_size)
        caption, spans = detection_caption(labels, list(self.names.values()), rng, self.max_phrases)
        height, width = image.shape[:2]
        target = Target(from_pixels_xyxy(boxes, height, width), [[spans[n]] for n in labels])
        return Sample(image, caption, target, labels, {"image_id": info["id"]})


class OdvgDataset:
    """ODVG jsonl: one image per line, either ``detection`` (instances with bbox xyxy, label, category) or
    ``grounding`` (caption and regions with bbox and phrase). ``label_map`` (json {label: name}) names
    detection labels when instances carry no ``category``."""

    def __init__(self, jsonl: str | Path, image_root: str | Path, label_map: str | Path | None = None,
                 image_size: int = 512, max_size: int = 853, seed: int = 0, max_phrases: int = 40):
        self.records = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
        self.image_root = Path(image_root)
        self.label_map = {str(k): v.lower().strip() for k, v in json.loads(Path(label_map).read_text()).items()} \
            if label_map else {}
        self.image_size = image_size
        self.max_size = max_size
        self.seed = seed
        self.max_phrases = max_phrases
        names = set(self.label_map.values())
        for r in self.records:
            for inst in r.get("detection", {}).get("instances", []):
                names.add(self._name(inst))
        self.names = sorted(n for n in names if n)

    def _name(self, inst: dict) -> str:
        if inst.get("category"):
            return str(inst["category"]).lower().strip()
        return self.label_map.get(str(inst.get("label")), str(inst.get("label")))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index % len(self.records)]
        rng = np.random.default_rng([self.seed, index])
        image = read_rgb(self.image_root / record["filename"])
        if "grounding" in record:
            caption = record["grounding"]["caption"].lower().strip()
            boxes, spans, phrases = [], [], []
            for region in record["grounding"].get("regions", []):
                phrase = region["phrase"].lower().strip()
                start = caption.find(phrase)
                if start < 0:
                    continue
                region_boxes = region["bbox"]
                region_boxes = region_boxes if isinstance(region_boxes[0], (list, tuple)) else [region_boxes]
                for box in region_boxes:
                    boxes.append(box)
                    spans.append([(start, start + len(phrase))])
                    phrases.append(phrase)
            boxes = np.array(boxes, np.float32).reshape(-1, 4)
            image, boxes = resize_to(image, boxes, self.image_size, self.max_size)
            height, width = image.shape[:2]
            return Sample(image, caption, Target(from_pixels_xyxy(boxes, height, width), spans), phrases)
        instances = record.get("detection", {}).get("instances", [])
        boxes = np.array([inst["bbox"] for inst in instances], np.float32).reshape(-1, 4)
        labels = [self._name(inst) for inst in instances]
        image, boxes = resize_to(image, boxes, self.image_size, self.max_size)
        caption, span_of = detection_caption(labels, self.names, rng, self.max_phrases)
        height, width = image.shape[:2]
        return Sample(image, caption, Target(from_pixels_xyxy(boxes, height, width),
                                             [[span_of[n]] for n in labels]), labels)
