"""Reading any supported layout (official ``.pth`` with ``weights_only=True``, Hugging Face folder, groundwatch
folder) into the official layout, and writing the groundwatch folder; ``convert`` joins the two."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import torch

from gdino.config import GroundingDinoConfig

from .accounting import check_keys
from .formats import (CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, VOCAB_FILE, WEIGHTS_FILE, CheckpointError, StateDict,
                      format_keys)
from .hf_config import config_from_hf, expected_shapes, infer_config
from .rename import drop_ignored_official, hf_to_official, is_hf_layout, is_official_layout


# --------------------------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------------------------


def _load_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt? ({exc})") from None


def _load_torch(path: Path) -> dict:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0]
        if "Weights only load failed" in reason:
            reason = "it holds Python objects besides tensors, which groundwatch refuses to unpickle"
        raise CheckpointError(f"{path}: not a loadable weights file ({reason})") from None
    except Exception as exc:  # torch.load fails on garbage in many ways (RuntimeError, EOFError, IndexError, ...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch file, truncated or corrupt? ({reason})") from None
    return data


def _tensors_only(data, path: Path) -> StateDict:
    if isinstance(data, Mapping):
        for wrapper in ("model", "state_dict", "module"):
            if wrapper in data and isinstance(data[wrapper], Mapping):
                data = data[wrapper]
                break
    if not isinstance(data, Mapping) or not data:
        raise CheckpointError(f"{path}: not a checkpoint (expected a dict of tensors, found {type(data).__name__})")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a checkpoint (entries that are not tensors: {format_keys(map(str, bad))})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in data.items()}


def _to_official(state: StateDict, path: Path) -> StateDict:
    if is_hf_layout(state):
        return hf_to_official(state)
    if is_official_layout(state):
        return drop_ignored_official(state)
    raise CheckpointError(
        f"{path}: unknown weights layout (neither official Grounding DINO nor Hugging Face); "
        f"first keys: {format_keys(list(state)[:5], limit=5)}"
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _load_hf_weights(folder: Path) -> StateDict:
    single = folder / WEIGHTS_FILE
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        state: StateDict = {}
        for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
            state.update(_load_safetensors(folder / shard))
        return state
    if (folder / "pytorch_model.bin").is_file():
        return _tensors_only(_load_torch(folder / "pytorch_model.bin"), folder / "pytorch_model.bin")
    raise CheckpointError(f"{folder}: Hugging Face folder without weights (no {WEIGHTS_FILE})")


def read_checkpoint(path: str | os.PathLike) -> tuple[StateDict, GroundingDinoConfig | None, Path | None]:
    """Read weights in any supported layout; returns ``(state_dict in the official layout, config, vocab path)``.

    ``config`` is None for bare weight files (official ``.pth``, lone ``.safetensors``); use :func:`infer_config`.
    ``vocab`` is the folder's ``vocab.txt`` when it has one.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"weights not found: {path}")
    if path.is_dir():
        vocab = path / VOCAB_FILE if (path / VOCAB_FILE).is_file() else None
        if (path / CONFIG_FILE).is_file():
            meta = _read_json(path / CONFIG_FILE)
            if meta.get("format") != FORMAT_NAME:
                raise CheckpointError(f"{path / CONFIG_FILE}: not a groundwatch config (format={meta.get('format')!r})")
            if meta.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(
                    f"{path}: groundwatch format version {meta.get('format_version')!r}, this version reads "
                    f"{FORMAT_VERSION}"
                )
            try:
                config = GroundingDinoConfig.from_dict(meta["config"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path / CONFIG_FILE}: bad model config ({exc})") from None
            if not (path / WEIGHTS_FILE).is_file():
                raise CheckpointError(f"{path}: groundwatch folder without {WEIGHTS_FILE}")
            return _to_official(_load_safetensors(path / WEIGHTS_FILE), path), config, vocab
        if (path / "config.json").is_file():
            config = config_from_hf(_read_json(path / "config.json"))
            state = _load_hf_weights(path)
            if not is_hf_layout(state):
                raise CheckpointError(f"{path}: config.json present but the weights are not in the Hugging Face layout")
            return hf_to_official(state), config, vocab
        raise CheckpointError(f"{path}: folder is not a checkpoint (no {CONFIG_FILE} or config.json)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    with path.open("rb") as handle:
        head = handle.read(9)
    # safetensors starts with a little-endian u64 header length followed by '{'; torch files are zip or pickle.
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        state = _load_safetensors(path)
    else:
        state = _tensors_only(_load_torch(path), path)
    return _to_official(state, path), None, None


def _distinct_storage(state: Mapping[str, torch.Tensor]) -> StateDict:
    """safetensors refuses tensors that share memory; aliases (the shared box head) are written as copies."""
    seen: set[tuple[int, int]] = set()
    out: StateDict = {}
    for key, value in state.items():
        value = value.detach().to("cpu").contiguous()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        out[key] = value.clone() if ident in seen else value
        seen.add(ident)
    return out


def save(state: Mapping[str, torch.Tensor], config: GroundingDinoConfig, dst: str | os.PathLike,
         vocab_path: str | os.PathLike | None = None) -> Path:
    """Write ``state`` (official layout) and ``config`` as a groundwatch folder at ``dst``; returns ``dst``.

    The folder is assembled next to ``dst`` and moved into place, so a crash never leaves half a checkpoint.
    """
    from safetensors.torch import save_file

    dst = Path(dst).expanduser()
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / CONFIG_FILE).is_file():
        raise CheckpointError(f"{dst}: folder is not empty and is not a groundwatch checkpoint; refusing to overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        save_file(_distinct_storage(state), str(staging / WEIGHTS_FILE),
                  metadata={"format": "pt", "layout": "official", "producer": FORMAT_NAME})
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": config.to_dict()}
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if vocab_path is not None:
            shutil.copyfile(vocab_path, staging / VOCAB_FILE)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # The old checkpoint moves aside, the new one takes its place, then the old one goes: at every moment one
    # whole checkpoint is at `dst` or beside it, never neither.
    previous = None
    try:
        if dst.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            previous.rmdir()
            dst.rename(previous)
        staging.rename(dst)
    except BaseException:
        if previous is not None and previous.exists() and not dst.exists():
            previous.rename(dst)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return dst


def convert(src: str | os.PathLike, dst: str | os.PathLike,
            check: Callable[[GroundingDinoConfig, StateDict], None] | None = None) -> tuple[Path, GroundingDinoConfig]:
    """Read ``src`` in any layout, verify it against its config and write a groundwatch folder at ``dst``.

    ``check(config, state)`` replaces the default verification (:func:`check_keys` against
    :func:`expected_shapes`); ``gdino.load`` users may pass one that builds the model itself.
    """
    source, target = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    if target.is_dir() and source != target and source.is_relative_to(target):
        raise CheckpointError(f"{dst} holds the source {src}: writing the converted checkpoint there would delete "
                              f"it; choose another destination folder")
    state, config, vocab = read_checkpoint(src)
    if config is None:
        config = infer_config(state)
    if check is None:
        check_keys(expected_shapes(config), state, what=str(src))
    else:
        check(config, state)
    return save(state, config, dst, vocab_path=vocab), config
