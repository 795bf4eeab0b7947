"""Helpers shared by the training tests: a very small model and a dataset that repeats a few samples."""

import dataclasses

import torch

from gdino.config import SwinConfig, TextConfig, tiny


def small_config():
    """A few hundred thousand parameters: random text encoder, one encoder layer, two decoder layers."""
    return dataclasses.replace(
        tiny(pretrained_text=None),
        backbone=SwinConfig(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4,
                            drop_path_rate=0.0),
        text=TextConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, pretrained=None),
        hidden_dim=64, num_heads=4, dim_feedforward=128, encoder_layers=1, decoder_layers=2, num_queries=12,
        num_feature_levels=4, fusion_droppath=0.0,
    )


class FixedBatch:
    """The same few samples at every step (an overfitting target)."""

    def __init__(self, samples):
        self.samples = samples

    def __getitem__(self, index):
        return self.samples[index % len(self.samples)]


def small_model():
    from gdino.model import GroundingDino

    torch.manual_seed(0)
    return GroundingDino(small_config())
