"""Strict key accounting: every key of a checkpoint must be one the model has, with its shape, and the reverse;
``load_state`` is the one place weights enter a model."""

from __future__ import annotations

from typing import Mapping

import torch

from .formats import CheckpointError, format_keys


# --------------------------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------------------------


def _shape_of(value) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(int(v) for v in value)
    return None


def check_keys(expected, got, *, what: str = "checkpoint") -> None:
    """Strict accounting: raise :class:`CheckpointError` unless ``got`` has exactly the keys of ``expected``.

    ``expected``/``got``: mappings of key -> tensor or shape (shapes are then compared too), or iterables of keys.
    The message lists missing keys, unexpected keys and shape mismatches, sorted and truncated to a readable length.
    """
    expected_map = expected if isinstance(expected, Mapping) else dict.fromkeys(expected)
    got_map = got if isinstance(got, Mapping) else dict.fromkeys(got)
    missing = sorted(set(expected_map) - set(got_map))
    unexpected = sorted(set(got_map) - set(expected_map))
    mismatched = []
    for key in sorted(set(expected_map) & set(got_map)):
        want, have = _shape_of(expected_map[key]), _shape_of(got_map[key])
        if want is not None and have is not None and want != have:
            mismatched.append(f"{key} {have} (expected {want})")
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{what} does not match the model:"]
    if missing:
        lines.append(f"  {len(missing)} missing keys: {format_keys(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys: {format_keys(unexpected)}")
    if mismatched:
        lines.append(f"  {len(mismatched)} shape mismatches: {format_keys(mismatched, limit=10)}")
    raise CheckpointError("\n".join(lines))


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, what: str = "checkpoint") -> None:
    """Load ``state`` (official key layout) into ``model`` after strict accounting (:func:`check_keys`).

    The one place weights enter a model (``gdino.load``, resuming training). The text encoder (``bert.*``) may be
    absent only when the model's config builds it from its package (``text.pretrained``, e.g. the frozen MiniLM
    of the default model, which is not written into checkpoints); its weights then went through the same check
    when the model was built (``gdino.model.text_encoder``).
    """
    expected = model.state_dict()
    if model.config.text.pretrained is not None and not any(key.startswith("bert.") for key in state):
        expected = {key: value for key, value in expected.items() if not key.startswith("bert.")}
    check_keys(expected, state, what=what)
    full = model.state_dict()
    full.update(state)
    model.load_state_dict(full, strict=True)
