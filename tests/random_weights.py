"""Random Grounding DINO weights for the parity and export tests and the CPU benchmarks (benchmarks/_common.py).

A freshly initialised model hides two paths: the text-image fusion gammas start at 1e-4 and the box heads' last
layers at zero (every box would be its anchor). `perturb_near_zero` draws those at random so that both paths carry
signal, as trained weights do; the same seed gives the same weights in groundwatch's model and in transformers'.
"""

from __future__ import annotations

import torch

from gdino.checkpoint import config_to_hf
from gdino.config import GroundingDinoConfig

# The fusion gammas under groundwatch's (official) names and under transformers' names.
FUSION_GAMMAS = ("gamma_v", "gamma_l", "vision_param", "text_param")


def perturb_near_zero(model: torch.nn.Module) -> torch.nn.Module:
    """Draw the fusion gammas from N(0, 0.5) and the box heads' last layers from N(0, 0.05), in place."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(FUSION_GAMMAS):
                param.normal_(0.0, 0.5)
            if "bbox_embed" in name and ".layers.2." in name:
                param.normal_(0.0, 0.05)
    return model


def random_model(config: GroundingDinoConfig, seed: int = 0):
    """groundwatch's `GroundingDino` with random weights (seeded, near-zero paths perturbed), in eval mode."""
    from gdino.model import GroundingDino

    torch.manual_seed(seed)
    return perturb_near_zero(GroundingDino(config).eval())


def random_hf_model(config: GroundingDinoConfig, seed: int = 0):
    """transformers' `GroundingDinoForObjectDetection` for `config` with random weights (seeded, near-zero paths
    perturbed), in eval mode: the independent implementation the parity checks compare with."""
    import transformers  # optional: the test extra installs it

    torch.manual_seed(seed)
    hf_config = transformers.GroundingDinoConfig(**config_to_hf(config))
    return perturb_near_zero(transformers.GroundingDinoForObjectDetection(hf_config).eval())
