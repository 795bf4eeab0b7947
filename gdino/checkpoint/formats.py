"""The groundwatch checkpoint folder's names and version, and the error every checkpoint failure raises."""

from __future__ import annotations

from typing import Iterable

import torch


FORMAT_NAME = "groundwatch"
FORMAT_VERSION = 1
CONFIG_FILE = "groundwatch.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.txt"

StateDict = dict[str, torch.Tensor]


class CheckpointError(Exception):
    """A weights file or folder that cannot be used, with a message that says why."""


def format_keys(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
