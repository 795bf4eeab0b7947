"""The training loop end to end on a very small model: it overfits a tiny batch, checkpoints and resumes."""

import dataclasses

import pytest

from gdino.train.data import ShapesDataset
from gdino.train.loop import LoopConfig, OptimConfig, Trainer
from gdino.train.losses import SetCriterion
from gdino.train.matcher import HungarianMatcher
from training import FixedBatch, small_model


def _overfit(seed, tmp_path):
    """Box, GIoU and class losses logged every 10 steps while the loop fits two fixed scenes of data seed `seed`."""
    source = ShapesDataset(seed=seed, image_size=64, referring=0.0, clutter=0.0, max_objects=2)
    data = FixedBatch([source[0], source[1]])
    trainer = Trainer(small_model(), SetCriterion(HungarianMatcher()), data,
                      OptimConfig(steps=200, batch_size=2, lr=2e-3, lr_backbone=2e-3, lr_text=0.0, warmup=5,
                                  clip=1.0, final_lr_fraction=0.2, threads=2),
                      LoopConfig(out_dir=str(tmp_path / f"run{seed}"), log_every=10, checkpoint_every=0),
                      progress=False)
    return [h for h in trainer.run() if "bbox" in h]


def test_loop_overfits_a_tiny_batch(tmp_path):
    """Box L1 of the matched queries (summed over cxcywh, per box) falls from ~0.4 to near zero on two fixed
    scenes within 200 steps: the matcher, the losses and the optimiser work together. Dropout and drop-path are
    off (the text encoder frozen) so that the batch can be fitted exactly.

    One fit of so small a model can settle in a poor minimum (queries swap targets as the encoder's proposals
    move), and which run does depends on float rounding: data seed 5 at 120 steps and lr 3e-3 fitted on an
    Intel Xeon and stalled at box L1 0.19 on an AMD EPYC (2026-12-07); at 200 steps and lr 2e-3 seeds 5-8 and
    10-12 fit (box L1 0.002-0.006, from 0.3-0.6) and seed 9 stalls at 0.27 on the EPYC. So up to three data
    seeds are tried and one full fit passes; a loop that does not learn stays near the start on all three."""
    tried = []
    for seed in (5, 6, 7):
        logged = _overfit(seed, tmp_path)
        first = logged[0]

        def settled(name):  # mean of the last two logs: one noisy step cannot decide
            return sum(h[name] for h in logged[-2:]) / 2

        assert first["bbox"] > 0.2
        fitted = (settled("bbox") < first["bbox"] / 5 and settled("giou") < first["giou"] / 3
                  and settled("class") < first["class"] / 10)
        tried.append((seed, [round(h["bbox"], 3) for h in logged], [round(h["class"], 3) for h in logged]))
        if fitted:
            return
    raise AssertionError(f"no data seed was fitted (seed, box L1 and class loss every 10 steps): {tried}")


def test_checkpoint_resume_continues_the_same_run(tmp_path):
    source = ShapesDataset(seed=3, image_size=64, referring=0.5, max_objects=2)
    optim = OptimConfig(steps=4, batch_size=2, lr=1e-3, lr_backbone=1e-3, lr_text=1e-3, warmup=1)
    loop = LoopConfig(out_dir=str(tmp_path / "run"), log_every=1, checkpoint_every=2, keep_checkpoints=1)
    full = Trainer(small_model(), SetCriterion(HungarianMatcher()), source, optim, loop, progress=False)
    full.run()
    # a second run stops at step 2 (its checkpoint), a third resumes from it and finishes
    loop2 = dataclasses.replace(loop, out_dir=str(tmp_path / "run2"))
    first_half = Trainer(small_model(), SetCriterion(HungarianMatcher()), source,
                         dataclasses.replace(optim, steps=2), loop2, progress=False)
    first_half.run()
    resumed = Trainer(small_model(), SetCriterion(HungarianMatcher()), source, optim, loop2, progress=False)
    assert resumed.resume()
    assert resumed.step == 2
    resumed.run()
    assert sorted(p.name for p in (tmp_path / "run2").glob("step*")) == ["step0000004"]
    a = full.model.state_dict()
    b = resumed.model.state_dict()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-4, worst


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_resume_never_unpickles_code_from_a_checkpoint(tmp_path):
    """`--resume DIR` used to torch.load trainer.pt with weights_only=False: a checkpoint from anywhere could
    run code when resumed. Only tensors and plain containers may be loaded."""
    import pickle

    import torch

    source = ShapesDataset(seed=3, image_size=64, referring=0.0, max_objects=1)
    optim = OptimConfig(steps=1, batch_size=1, lr=1e-3, lr_backbone=1e-3, lr_text=0.0, warmup=1)
    loop = LoopConfig(out_dir=str(tmp_path / "run"), log_every=1, checkpoint_every=1, keep_checkpoints=1)
    trainer = Trainer(small_model(), SetCriterion(HungarianMatcher()), source, optim, loop, progress=False)
    trainer.run()
    checkpoint = tmp_path / "run" / "step0000001"
    state = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=True)
    payload = _RunsCodeWhenUnpickled()
    payload.marker = str(tmp_path / "code-ran")
    state["history"] = [payload]
    torch.save(state, checkpoint / "trainer.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    fresh = Trainer(small_model(), SetCriterion(HungarianMatcher()), source, optim, loop, progress=False)
    try:
        fresh.resume(checkpoint)
    except pickle.UnpicklingError:
        pass
    assert not (tmp_path / "code-ran").exists(), "resuming a checkpoint ran code from it"


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(tmp_path, capsys):
    """`groundwatch train` run twice without --resume wrote over the first run's step folders, and checkpoint
    pruning (the newest `keep_checkpoints` by name) then deleted each new checkpoint as it was written when the
    first run had gone further: hours of training lost, and a final message naming a folder that no longer
    existed. A fresh run into a folder that holds a run is refused before anything is built; --resume continues."""
    from gdino.train.cli import train_main

    run = tmp_path / "run"
    (run / "step0003500" / "weights").mkdir(parents=True)
    (run / "step0003500" / "weights" / "model.safetensors").write_bytes(b"weights of hours")
    (run / "latest").write_text("step0003500")
    config = tmp_path / "train.toml"
    config.write_text(f'[optim]\nsteps = 2\n\n[loop]\nout_dir = "{run.as_posix()}"\n')
    for argv in ([str(config)], [str(tmp_path / "train.toml"), "--out-dir", str(run)]):
        with pytest.raises(SystemExit) as exit_info:
            train_main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "already holds a training run" in err and "--resume" in err
    assert (run / "step0003500" / "weights" / "model.safetensors").read_bytes() == b"weights of hours"
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step0003500"]


def test_eval_refuses_a_report_over_the_weights_or_in_a_missing_folder(tmp_path, capsys):
    """`groundwatch eval --weights W --json W/model.safetensors` wrote the report over the weights after minutes
    of evaluation, and a --json in a folder that does not exist failed only then, with a traceback. Both are
    refused before the model loads; a report beside the weights is fine."""
    from gdino.train.cli import eval_main

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"weights")
    (weights / "groundwatch.json").write_text("{}")
    for report, message in ((weights / "model.safetensors", "would overwrite the weights"),
                            (weights / "groundwatch.json", "would overwrite the weights"),
                            (tmp_path / "missing" / "r.json", "does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            eval_main(["--weights", str(weights), "--json", str(report)])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, report
    assert (weights / "model.safetensors").read_bytes() == b"weights"
    assert (weights / "groundwatch.json").read_text() == "{}"


def test_eval_reports_unusable_weights_in_one_line(tmp_path, capsys):
    """`groundwatch eval` printed a traceback for weights it could not load (a truncated safetensors file, a
    pickle holding objects, /dev/zero, a missing file) where `detect` and `export` say what is wrong in one line.
    It now answers as they do: one line on stderr, exit status 1."""
    import pickle
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from gdino.train.cli import eval_main

    whole = tmp_path / "whole.safetensors"
    save_file({"weight": torch.zeros(64, 64)}, str(whole))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    objects = tmp_path / "objects.pth"
    objects.write_bytes(pickle.dumps({"a": ValueError("x")}, protocol=2))
    cases = [truncated, objects, tmp_path / "missing.pth"]
    if Path("/dev/zero").exists():
        cases.append(Path("/dev/zero"))
    for weights in cases:
        assert eval_main(["--weights", str(weights), "--num-images", "1", "--device", "cpu"]) == 1, weights
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith("groundwatch eval: error: "), lines[0]
