"""`groundwatch train` as a new user meets it (found by following README.md in a scratch folder): the README's
`groundwatch train configs/default.toml` run from another folder, a config with a typo, and Ctrl-C a few steps in."""

from __future__ import annotations

import os
import signal

import pytest

from gdino.train import cli as train_cli


def _train(argv):
    try:
        return train_cli.train_main(argv)
    except KeyboardInterrupt:  # pytest would stop the session on it
        pytest.fail("KeyboardInterrupt escaped groundwatch train (a traceback, and the steps since the last "
                    "checkpoint lost)")


@pytest.mark.parametrize("text, expected", [
    (None, "cannot read"),
    ("[model\n", "not valid TOML"),
    ('[model]\npreset = "tiny"\nfoo = 1\n', "[model] unknown key 'foo'"),
    ('[optim]\nstep = 3\n', "[optim] unknown key 'step'"),
    ('[data]\nkind = "coco"\nannotations = "missing.json"\nimage_root = "."\n', "missing.json"),
])
def test_a_config_it_cannot_use_is_one_line(text, expected, tmp_path, monkeypatch, capsys):
    """Each of these printed a traceback (FileNotFoundError, TOMLDecodeError, ValueError)."""
    config = tmp_path / "train.toml"
    if text is not None:
        config.write_text(text)
    monkeypatch.chdir(tmp_path)
    assert _train([str(config), "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and expected in err, err
    assert err.startswith("groundwatch train: error: ")


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, monkeypatch, capsys):
    """Ctrl-C a few steps into `groundwatch train` printed a KeyboardInterrupt traceback and lost every step since
    the last checkpoint (the default config saves every 100 steps: 97 steps lost at the first try). It now ends
    the step under way, saves a checkpoint and says how to go on; --resume continues from it."""
    config = tmp_path / "train.toml"
    config.write_text('[model]\npreset = "tiny"\npretrained_text = ""\n[data]\nkind = "shapes"\nimage_size = 64\n'
                      'max_objects = 1\n[optim]\nsteps = 5\nbatch_size = 1\nthreads = 2\n'
                      f'[loop]\nout_dir = "{(tmp_path / "run").as_posix()}"\ncheckpoint_every = 100\nlog_every = 1\n')
    build_dataset = train_cli.build_dataset

    class CtrlCAtStepTwo:
        def __init__(self, dataset):
            self.dataset = dataset

        def __getitem__(self, index):
            if index == 2:  # batch_size 1: the third step's sample
                os.kill(os.getpid(), signal.SIGINT)
            return self.dataset[index]

        def __getattr__(self, name):
            return getattr(self.dataset, name)

    monkeypatch.setattr(train_cli, "build_dataset", lambda cfg: CtrlCAtStepTwo(build_dataset(cfg)))
    previous = signal.getsignal(signal.SIGINT)
    assert _train([str(config), "--no-progress"]) == 130
    assert signal.getsignal(signal.SIGINT) is previous
    err = capsys.readouterr().err
    assert "Traceback" not in err and "step 3" in err and "--resume" in err, err
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "step0000003"
    assert (run / "step0000003" / "weights" / "model.safetensors").exists()
    monkeypatch.setattr(train_cli, "build_dataset", build_dataset)
    assert _train([str(config), "--no-progress", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed at step 3" in out and "done: 5 steps" in out
