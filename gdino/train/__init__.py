"""Training for Grounding DINO: Hungarian matching, set losses, datasets (shapes world, COCO, ODVG), the loop.

``groundwatch train CONFIG`` and ``groundwatch eval`` are ``gdino.train.cli.train_main`` / ``eval_main``.
"""

from gdino.train.losses import SetCriterion, sigmoid_focal_loss
from gdino.train.matcher import HungarianMatcher
from gdino.train.targets import Target, positive_map

__all__ = ["HungarianMatcher", "SetCriterion", "Target", "positive_map", "sigmoid_focal_loss"]
