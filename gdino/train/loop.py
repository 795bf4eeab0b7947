"""The training loop: AdamW with per-module learning rates, warm-up and cosine decay, gradient clipping,
a curriculum for the shapes world, periodic checkpoints (resumable) and periodic evaluation."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gdino import checkpoint
from gdino.train.data import Batch, collate
from gdino.train.denoising import build_denoising
from gdino.train.losses import SetCriterion
from gdino.train.targets import positive_maps


@dataclass
class OptimConfig:
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4  # transformer, heads, input projections, feat_map
    lr_backbone: float = 1e-5  # Swin; 0 freezes it
    lr_text: float = 0.0  # BERT / MiniLM; 0 freezes it (and keeps it in eval mode: no dropout)
    weight_decay: float = 1e-4
    clip: float = 0.1
    warmup: int = 100
    final_lr_fraction: float = 0.05  # lr * this at the last step
    # "cosine": decay from the end of warm-up; "wsd": constant, then a linear cool-down over the last
    # ``cooldown_fraction`` of the steps (a run can be extended by resuming before its cool-down started).
    schedule: str = "cosine"
    cooldown_fraction: float = 0.2
    threads: int = 0  # torch.set_num_threads; 0 leaves the default


@dataclass
class LoopConfig:
    out_dir: str = "runs/train"
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 250
    eval_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    # Curriculum for the shapes world: until step ``easy_steps`` scenes have at most ``easy_max_objects``
    # objects and ``easy_clutter`` clutter.
    easy_steps: int = 0
    easy_max_objects: int = 3
    easy_clutter: float = 0.3


def parameter_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW groups by module: backbone, text encoder (``bert``), the rest. A zero lr freezes the group.
    Norms and biases get no weight decay."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    lrs = {"backbone": optim.lr_backbone, "text": optim.lr_text, "transformer": optim.lr}
    for name, param in model.named_parameters():
        part = "backbone" if name.startswith("backbone.") else "text" if name.startswith("bert.") else "transformer"
        if lrs[part] <= 0:
            param.requires_grad_(False)
            continue
        param.requires_grad_(True)
        no_decay = param.ndim <= 1 or name.endswith(".bias") or "norm" in name or "relative_position" in name
        groups.setdefault((part, no_decay), []).append(param)
    return [{"params": params, "lr": lrs[part], "base_lr": lrs[part], "name": f"{part}{'_nd' if nd else ''}",
             "weight_decay": 0.0 if nd else optim.weight_decay}
            for (part, nd), params in groups.items()]


def lr_factor(step: int, optim: OptimConfig) -> float:
    if optim.warmup and step < optim.warmup:
        return (step + 1) / optim.warmup
    if optim.schedule == "wsd":
        cooldown = max(1, int(optim.steps * optim.cooldown_fraction))
        start = optim.steps - cooldown
        if step < start:
            return 1.0
        return 1.0 - (1.0 - optim.final_lr_fraction) * min(1.0, (step - start) / cooldown)
    if optim.schedule != "cosine":
        raise ValueError(f"unknown lr schedule {optim.schedule!r}: 'cosine' or 'wsd'")
    progress = min(1.0, (step - optim.warmup) / max(1, optim.steps - optim.warmup))
    return optim.final_lr_fraction + (1 - optim.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def loss_on_batch(model, criterion: SetCriterion, batch: Batch, device) -> dict[str, torch.Tensor]:
    images = batch.images.to(device)
    pixel_mask = batch.pixel_mask.to(device)
    text = model.encode_text(list(batch.captions))
    maps = positive_maps(batch.targets, text.offsets, text.num_tokens, device)
    boxes = [t.boxes_cxcywh.to(device) for t in batch.targets]
    denoising = None
    if criterion.denoising and model.training:

        settings = criterion.denoising
        denoising = build_denoising(boxes, maps, text.features, total_queries=settings["queries"],
                                    box_noise=settings["box_noise"], label_noise=settings["label_noise"])
    out = model(images, text, pixel_mask=pixel_mask if batch.padded else None, denoising=denoising)
    return criterion(out, boxes, maps, text.token_mask, denoising)


def text_encoder_is_shipped_separately(model) -> bool:
    """A frozen, pretrained text encoder (MiniLM from its package) is not written into checkpoints: the loader
    rebuilds it from the package, which keeps the default model's weights small."""
    return getattr(model.config.text, "pretrained", None) is not None and not any(
        p.requires_grad for p in model.bert.parameters())


def save_weights(model: torch.nn.Module, directory: str | Path, skip_text_encoder: bool | None = None) -> Path:
    """A groundwatch checkpoint folder (``gdino.checkpoint.save``: safetensors in the official key layout plus
    the model config). A frozen pretrained text encoder is left out (see above)."""
    if skip_text_encoder is None:
        skip_text_encoder = text_encoder_is_shipped_separately(model)
    state = {k: v for k, v in model.state_dict().items() if not (skip_text_encoder and k.startswith("bert."))}
    return checkpoint.save(state, model.config, directory)


def load_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Load a folder written by ``save_weights`` into ``model`` (resuming): ``gdino.checkpoint.load_state``'s
    strict accounting, the same as ``gdino.load``."""
    state, _, _ = checkpoint.read_checkpoint(directory)
    checkpoint.load_state(model, state, what=str(directory))


class Trainer:
    """Runs ``optim.steps`` steps over ``dataset`` (indexable; sample ``i`` of step s is ``dataset[s * B + i]``,
    so a resumed run sees exactly the data it would have seen)."""

    def __init__(self, model, criterion: SetCriterion, dataset, optim: OptimConfig, loop: LoopConfig,
                 evaluate: Callable[[torch.nn.Module, int], dict] | None = None, device: str = "cpu",
                 run_config: dict | None = None, progress: bool = True):
        self.model = model.to(device)
        self.criterion = criterion
        self.dataset = dataset
        self.optim_config = optim
        self.loop = loop
        self.evaluate = evaluate
        self.device = device
        self.run_config = run_config or {}
        self.progress = progress
        self.out_dir = Path(loop.out_dir)
        self.optimizer = torch.optim.AdamW(parameter_groups(model, optim), lr=optim.lr,
                                           weight_decay=optim.weight_decay)
        self.step = 0
        self.history: list[dict] = []
        self.stop_requested = False  # set by request_stop (Ctrl-C): the run ends after the step under way

    def request_stop(self) -> None:
        """End the run after the step under way, with a checkpoint of it (safe from a signal handler)."""
        self.stop_requested = True

    # -- checkpoints -----------------------------------------------------------------------------------------

    def save(self) -> Path:
        directory = self.out_dir / f"step{self.step:07d}"
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(self.model, directory / "weights")
        torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step,
                    "torch_rng": torch.get_rng_state(), "history": self.history[-200:]},
                   directory / "trainer.pt")
        (directory / "run.json").write_text(json.dumps(self.run_config, indent=2, default=str))
        latest = self.out_dir / "latest"
        latest.write_text(directory.name)
        kept = sorted(p for p in self.out_dir.glob("step*") if p.is_dir())
        for old in kept[: -self.loop.keep_checkpoints] if self.loop.keep_checkpoints > 0 else []:
            shutil.rmtree(old)
        return directory

    def resume(self, directory: str | Path | None = None) -> bool:
        """Load weights, optimizer state and step from ``directory`` (default: the run's latest)."""
        if directory is None:
            latest = self.out_dir / "latest"
            if not latest.exists():
                return False
            directory = self.out_dir / latest.read_text().strip()
        directory = Path(directory)
        load_weights(self.model, directory / "weights")
        state = torch.load(directory / "trainer.pt", map_location="cpu", weights_only=True)  # never code from a file
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        self.history = list(state.get("history", []))
        return True

    # -- loop ------------------------------------------------------------------------------------------------

    def _apply_curriculum(self) -> None:
        ds = self.dataset
        if not hasattr(ds, "clutter") or self.loop.easy_steps <= 0:
            return
        easy = self.step < self.loop.easy_steps
        if not hasattr(self, "_full_difficulty"):
            self._full_difficulty = (ds.clutter, ds.max_objects)
        if easy:
            ds.clutter, ds.max_objects = self.loop.easy_clutter, self.loop.easy_max_objects
        else:
            ds.clutter, ds.max_objects = self._full_difficulty

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.optim_config.lr_text <= 0:
            self.model.bert.eval()  # frozen: no dropout, deterministic features

    def run(self) -> list[dict]:
        optim, loop = self.optim_config, self.loop
        if optim.threads:
            torch.set_num_threads(optim.threads)
        if self.step == 0:  # a resumed run keeps the random state its checkpoint restored
            torch.manual_seed(loop.seed)
            random.seed(loop.seed)
            np.random.seed(loop.seed % 2**32)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / "log.jsonl"
        bar = None
        if self.progress:
            from tqdm import tqdm  # only for a progress bar on a terminal

            bar = tqdm(total=optim.steps, initial=self.step, dynamic_ncols=True, mininterval=5.0)
        self._set_train_mode()
        running: dict[str, float] = {}
        started = time.time()
        while self.step < optim.steps and not self.stop_requested:
            self._apply_curriculum()
            factor = lr_factor(self.step, optim)
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            samples = [self.dataset[self.step * optim.batch_size + i] for i in range(optim.batch_size)]
            batch = collate(samples)
            losses = loss_on_batch(self.model, self.criterion, batch, self.device)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {self.step}: {loss.item()}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optim.clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                               optim.clip)
            self.optimizer.step()
            self.step += 1
            for key in ("loss", "class", "bbox", "giou", "enc_class", "enc_bbox", "dn_class", "dn_bbox"):
                if key in losses:
                    running[key] = running.get(key, 0.0) + float(losses[key].detach())
            running["n"] = running.get("n", 0) + 1
            if bar is not None:
                bar.update(1)
            if self.step % loop.log_every == 0 or self.step == optim.steps:
                n = running.pop("n")
                record = {"step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                          "elapsed_s": round(time.time() - started, 1)}
                record.update({k: round(v / n, 5) for k, v in running.items()})
                running = {}
                self.history.append(record)
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=record["loss"], l1=record.get("bbox"), giou=record.get("giou"))
            if loop.checkpoint_every and self.step % loop.checkpoint_every == 0 and self.step < optim.steps:
                self.save()
            if self.evaluate is not None and loop.eval_every and self.step % loop.eval_every == 0 \
                    and self.step < optim.steps:
                self._run_eval(log_path)
        if bar is not None:
            bar.close()
        if self.stop_requested:  # interrupted: a checkpoint to resume from, no final evaluation
            if self.step > 0 and not (self.out_dir / f"step{self.step:07d}").is_dir():
                self.save()
            return self.history
        self.save()
        if self.evaluate is not None:
            self._run_eval(log_path)
        return self.history

    def _run_eval(self, log_path: Path) -> dict:
        self.model.eval()
        with torch.no_grad():
            metrics = self.evaluate(self.model, self.step)
        self._set_train_mode()
        record = {"step": self.step, "eval": metrics}
        self.history.append(record)
        with open(log_path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        return metrics


def config_from_dict(cls, data: dict, section: str):
    """A dataclass from a TOML table; unknown keys are an error naming them all."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"[{section}] unknown keys {unknown}; known: {sorted(known)}")
    return cls(**data)
