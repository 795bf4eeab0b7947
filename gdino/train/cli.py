"""``groundwatch train CONFIG`` and ``groundwatch eval``.

A training config is TOML with four tables (every key optional; unknown keys are an error)::

    [model]                # preset = "tiny" | "swint_ogc" | "swinb_cogcoor"; pretrained_text = "minilm" | ""
    preset = "tiny"        # or: weights = "default" | "path/model.safetensors" to fine-tune a loaded model
    [data]                 # kind = "shapes" | "coco" | "odvg"
    kind = "shapes"
    image_size = 256
    [optim]                # gdino.train.loop.OptimConfig: steps, batch_size, lr, lr_backbone, lr_text, ...
    [loop]                 # gdino.train.loop.LoopConfig: out_dir, seed, checkpoint_every, eval_every, ...
    [loss]                 # matcher_class/bbox/giou, loss_class/bbox/giou, focal_alpha, aux_loss, encoder_loss,
                           # denoising (contrastive denoising queries), dn_queries, dn_box_noise, dn_label_noise
    [eval]                 # num_images, image_size, seed (shapes held-out evaluation during/after training)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tomllib
from pathlib import Path

import torch

import gdino
from gdino import config as configs
from gdino.checkpoint import CheckpointError
from gdino.cli import _InputError, _fail
from gdino.evaluate import evaluate_shapes, evaluate_world, format_world_report
from gdino.train import data
from gdino.train.loop import LoopConfig, OptimConfig, Trainer, config_from_dict
from gdino.train.losses import build_criterion

DATA_KEYS = {
    "shapes": {"kind", "image_size", "seed", "split", "referring", "clutter", "max_objects", "num_negatives", "world",
               "hard_negatives", "partial", "template_weights", "backgrounds"},
    "coco": {"kind", "annotations", "image_root", "image_size", "max_size", "seed", "max_phrases"},
    "odvg": {"kind", "jsonl", "image_root", "label_map", "image_size", "max_size", "seed", "max_phrases"},
}
MODEL_KEYS = {"preset", "pretrained_text", "weights"}
LOSS_KEYS = {"matcher_class", "matcher_bbox", "matcher_giou", "loss_class", "loss_bbox", "loss_giou",
             "focal_alpha", "aux_loss", "encoder_loss", "denoising", "dn_queries", "dn_box_noise", "dn_label_noise"}
EVAL_KEYS = {"num_images", "image_size", "seed", "referring_images"}
TABLES = {"model", "data", "optim", "loop", "loss", "eval"}


def read_config(path: str | Path) -> dict:
    """Parse and check a training config; every problem is reported at once (ValueError; OSError when it cannot
    be read)."""
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except OSError as exc:
        raise OSError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    problems = []
    for table in sorted(set(config) - TABLES):
        problems.append(f"unknown table [{table}]")
    kind = config.get("data", {}).get("kind", "shapes")
    if kind not in DATA_KEYS:
        problems.append(f"[data] kind {kind!r} is not one of {sorted(DATA_KEYS)}")
    else:
        for key in sorted(set(config.get("data", {})) - DATA_KEYS[kind]):
            problems.append(f"[data] unknown key {key!r} for kind {kind!r}")
    for table, keys in (("model", MODEL_KEYS), ("loss", LOSS_KEYS), ("eval", EVAL_KEYS)):
        for key in sorted(set(config.get(table, {})) - keys):
            problems.append(f"[{table}] unknown key {key!r}")

    for table, cls in (("optim", OptimConfig), ("loop", LoopConfig)):
        known = {f.name for f in dataclasses.fields(cls)}
        for key in sorted(set(config.get(table, {})) - known):
            problems.append(f"[{table}] unknown key {key!r}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return config


def build_model(model_cfg: dict):
    """A fresh model from a preset, or a loaded one (``weights``) to fine-tune."""
    from gdino.model import GroundingDino  # the model imports timm (seconds): only when one is built

    weights = model_cfg.get("weights")
    if weights:
        return load_for_eval(weights)  # fine-tuning: the loop puts it back in training mode
    preset = model_cfg.get("preset", "tiny")
    if preset not in configs.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(configs.PRESETS)}")
    if preset == "tiny":
        text = model_cfg.get("pretrained_text", "minilm") or None
        config = configs.tiny(pretrained_text=text)
    else:
        config = configs.PRESETS[preset]()
    return GroundingDino(config)


def build_dataset(data_cfg: dict):
    """The one place the config's [data] table is read."""

    cfg = dict(data_cfg)
    kind = cfg.pop("kind", "shapes")
    if kind == "shapes":
        if "num_negatives" in cfg:
            cfg["num_negatives"] = tuple(cfg["num_negatives"])
        return data.ShapesDataset(**cfg)
    if kind == "coco":
        return data.CocoDataset(**cfg)
    return data.OdvgDataset(**cfg)


class _Cycle:
    """A finite dataset seen as an endless one (step * batch + i wraps around)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, index):
        return self.dataset[index % len(self.dataset)]

    def __getattr__(self, name):
        return getattr(self.dataset, name)


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="groundwatch train", description="Train or fine-tune Grounding DINO.")
    parser.add_argument("config", help="TOML training config")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from the run's latest checkpoint (or a given checkpoint directory)")
    parser.add_argument("--out-dir", help="override [loop] out_dir")
    parser.add_argument("--steps", type=int, help="override [optim] steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")
    args = parser.parse_args(argv)

    try:
        config = read_config(args.config)
        optim = config_from_dict(OptimConfig, config.get("optim", {}), "optim")
        loop = config_from_dict(LoopConfig, config.get("loop", {}), "loop")
    except (OSError, ValueError) as exc:
        return _fail(parser.prog, _InputError(str(exc)))
    if args.out_dir:
        loop.out_dir = args.out_dir
    if args.steps:
        optim.steps = args.steps
    out_dir = Path(loop.out_dir)
    earlier = sorted(p.name for p in out_dir.glob("step*") if p.is_dir()) if out_dir.is_dir() else []
    if not args.resume and (earlier or (out_dir / "latest").exists()):
        # A fresh run there would overwrite its checkpoints, and pruning would delete the new ones as they come.
        parser.error(f"{out_dir} already holds a training run ({', '.join(earlier[-3:]) or 'latest'}): continue it "
                     f"with --resume, or start a new one with --out-dir (nothing was changed)")
    torch.manual_seed(loop.seed)
    try:
        model = build_model(config.get("model", {}))
        dataset = build_dataset(config.get("data", {}))
    except (OSError, ValueError, TypeError, CheckpointError) as exc:  # weights or data the config names
        return _fail(parser.prog, _InputError(str(exc)))
    if not hasattr(dataset, "clutter"):
        dataset = _Cycle(dataset)
    evaluate = None
    eval_cfg = config.get("eval")
    if eval_cfg is not None and config.get("data", {}).get("kind", "shapes") == "shapes":
        image_size = int(eval_cfg.get("image_size", config.get("data", {}).get("image_size", 256)))

        def evaluate(model, step):
            return evaluate_shapes(model, num_images=int(eval_cfg.get("num_images", 100)),
                                   seed=int(eval_cfg.get("seed", 0)), image_size=image_size,
                                   referring_images=eval_cfg.get("referring_images"))

    run_config = {"config_file": str(args.config), "config": config, "argv": list(argv or sys.argv[1:])}
    trainer = Trainer(model, build_criterion(config.get("loss", {})), dataset, optim, loop, evaluate=evaluate,
                      device=args.device, run_config=run_config, progress=not args.no_progress)
    if args.resume:
        resumed = trainer.resume(None if args.resume == "latest" else args.resume)
        print(f"resumed at step {trainer.step}" if resumed else "nothing to resume: starting fresh", flush=True)
    with _first_ctrl_c_stops(trainer):
        trainer.run()
    latest = Path(loop.out_dir) / "latest"
    if trainer.stop_requested and trainer.step < optim.steps:
        if not latest.exists():  # Ctrl-C before the first step ended
            print(f"{parser.prog}: interrupted before the first step; nothing saved", file=sys.stderr)
            return 130
        checkpoint = latest.parent / latest.read_text().strip()
        print(f"{parser.prog}: interrupted at step {trainer.step}: checkpoint {checkpoint}; go on with "
              f"`{parser.prog} {args.config} --resume{f' --out-dir {args.out_dir}' if args.out_dir else ''}`",
              file=sys.stderr, flush=True)
        return 130
    final = Path(loop.out_dir) / latest.read_text().strip()
    print(f"done: {trainer.step} steps; weights in {final / 'weights'}", flush=True)
    return 0


@contextlib.contextmanager
def _first_ctrl_c_stops(trainer: Trainer):
    """The first Ctrl-C (SIGINT) lets the step under way finish and the run save a checkpoint; a second one
    interrupts at once (KeyboardInterrupt, losing the steps since the last checkpoint)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(_signum, _frame):
        print(f"\ngroundwatch train: stopping after step {trainer.step + 1} to save a checkpoint "
              "(Ctrl-C again: quit without it)", file=sys.stderr, flush=True)
        trainer.request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def load_for_eval(weights: str, device: str = "cpu"):
    """``default``, a checkpoint folder (any ``gdino.load`` layout) or a training step directory (its
    ``weights`` folder), through ``gdino.load``."""
    path = gdino.DEFAULT_WEIGHTS if weights == "default" else Path(weights)
    if (path / "weights").is_dir():
        path = path / "weights"
    return gdino.load(str(path), device=device)


_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_CHECKPOINT_NAMES = ("groundwatch.json", "config.json", "run.json", "latest")


def _report_path_problem(report: Path, weights: str) -> str | None:
    """Why ``--json`` cannot be written (checked before minutes of evaluation), or None: its folder is missing, or
    it would overwrite the weights' file or a checkpoint file of their folder."""
    folder = report.parent if str(report.parent) else Path(".")
    if not folder.is_dir():
        return f"cannot write --json {report}: the folder {folder} does not exist"
    if report.is_dir():
        return f"cannot write --json {report}: it is a folder"
    source = gdino.DEFAULT_WEIGHTS if weights == "default" else Path(weights)
    try:
        if source.is_file() and report.exists() and os.path.samefile(report, source):
            return f"--json {report} would overwrite the weights {weights}"
        if (source.is_dir() and report.exists() and report.resolve().is_relative_to(source.resolve())
                and (report.suffix.lower() in _CHECKPOINT_SUFFIXES or report.name in _CHECKPOINT_NAMES)):
            return f"--json {report} would overwrite the weights {weights} (a file of their folder)"
    except OSError:
        return None
    return None


def _write_report(path: Path, report: dict) -> None:
    """Under a temporary name, then renamed: the file is whole or absent."""
    temporary = path.with_name(f".{path.name}.part")
    temporary.write_text(json.dumps(report, indent=2))
    os.replace(temporary, path)


def eval_main(argv: list[str] | None = None, score_tracking=None) -> int:
    """``groundwatch eval``. ``score_tracking`` scores a tracker on the detector's output on held-out videos
    (``tracker.evaluation.score_videos``, passed in by the ``groundwatch`` command: gdino does not import the
    tracker); without it the tracking metrics are left out."""
    parser = argparse.ArgumentParser(prog="groundwatch eval",
                                     description="COCO AP/AP50, referring accuracy and tracking metrics on "
                                                 "held-out shapes-world sets (seeds never used in training).")
    parser.add_argument("--weights", default="default", help="'default', a .safetensors file or a checkpoint dir")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--referring-images", type=int)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="held-out set index (scene seeds are offset past "
                                                            "every training seed)")
    parser.add_argument("--tracking-videos", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("--world", choices=("classic", "wide"), default="classic",
                        help="wide: the wide world (gdino.world), training vs held-out background families and "
                             "per phrase template; --num-images per detection set, --referring-images per template")
    args = parser.parse_args(argv)
    if args.json:
        problem = _report_path_problem(Path(args.json), args.weights)
        if problem:
            parser.error(problem)

    try:
        model = load_for_eval(args.weights, args.device)
    except Exception as exc:  # missing, truncated or foreign weights, a bad --device: one line, as `detect` says it
        return _fail(parser.prog, exc)
    if args.world == "wide":
        report = evaluate_world(model, num_images=args.num_images, referring_images=args.referring_images or 40,
                                seed=args.seed, image_size=args.image_size, batch_size=args.batch_size)
        print(format_world_report(report))
        print(f"({report['meta']})")
        if args.json:
            _write_report(Path(args.json), report)
        return 0
    report = evaluate_shapes(model, num_images=args.num_images, seed=args.seed, image_size=args.image_size,
                             referring_images=args.referring_images, tracking_videos=args.tracking_videos,
                             batch_size=args.batch_size, score_tracking=score_tracking)
    print(format_report(report))
    if args.json:
        _write_report(Path(args.json), report)
    return 0


def format_report(report: dict) -> str:
    lines = []
    for name in ("held_out", "compositional"):
        if name in report:
            r = report[name]
            lines.append(f"{name:14s} AP {r['AP']:.3f}  AP50 {r['AP50']:.3f}  AP75 {r['AP75']:.3f}  "
                         f"AP90 {r.get('AP90', float('nan')):.3f}")
    if "referring" in report:
        lines.append(f"{'referring':14s} top-1 accuracy (IoU>=0.5) {report['referring']['accuracy']:.3f}")
    if "tracking" in report:
        t = report["tracking"]
        lines.append(f"{'tracking':14s} MOTA {t['MOTA']:.3f}  IDF1 {t['IDF1']:.3f}  (FN {t['FN']}, FP {t['FP']}, "
                     f"IDSW {t['IDSW']}, GT {t['GT']})")
    if "meta" in report:
        lines.append(f"({report['meta']})")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(train_main())
