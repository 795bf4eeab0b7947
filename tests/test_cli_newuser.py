"""The `groundwatch` command as a new user meets it: Ctrl-C, a closed pipe, a client command against a daemon
that needs keys, a folder it cannot write (found by following README.md from the top in a scratch folder)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from streamer import cli

from rtsp_server import free_port


def nobody() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt


def _main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except KeyboardInterrupt:  # pytest would stop the whole session on it
        pytest.fail("KeyboardInterrupt escaped groundwatch (a traceback on the terminal)")


def test_ctrl_c_in_a_client_command_is_one_line(monkeypatch, capsys):
    """Ctrl-C while `status` (or prompt, rules, zones, keys, replay, redact, detect, export, train, eval) waited
    used to print a KeyboardInterrupt traceback."""
    import streamer.client

    monkeypatch.setattr(streamer.client, "status", _interrupted)
    assert _main(["status", "--control", nobody()]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == "groundwatch status: interrupted"


def test_ctrl_c_in_a_delegated_command_is_one_line(monkeypatch, capsys):
    from gdino import cli as gdino_cli

    monkeypatch.setattr(gdino_cli, "export_main", _interrupted)
    assert _main(["export", "default", "-o", "x.onnx"]) == 130
    assert capsys.readouterr().err.strip() == "groundwatch export: interrupted"


def test_status_json_into_a_closed_pipe_is_quiet():
    """`groundwatch status --json | head -3` printed a BrokenPipeError traceback (seen on a running daemon)."""
    code = ("import sys, streamer.client, streamer.cli\n"
            "streamer.client.status = lambda *a, **k: {'ok': True, 'streams': {f's{i}': {'fps': i} for i in "
            "range(20000)}}\n"
            "sys.exit(streamer.cli.main(['status', '--json']))\n")
    process = subprocess.run(f"{sys.executable} -c \"{code}\" | head -c 10", shell=True, capture_output=True,
                             text=True, timeout=60)
    assert "Traceback" not in process.stderr and "BrokenPipeError" not in process.stderr, process.stderr


@pytest.mark.parametrize("command", [["rules"], ["zones", "cam"]])
def test_rules_and_zones_take_timeout_and_server_key(command, tmp_path, capsys):
    """`groundwatch rules`/`zones` had neither --timeout nor --server-key: they waited 30 s for a missing daemon
    (status and prompt: 5 s) and could not reach a daemon bound beyond loopback, whose control socket needs the
    CURVE key (README: clients pass its public key with --server-key)."""
    from streamer.auth import write_key_pair

    public, _ = write_key_pair(tmp_path / "keys")
    (tmp_path / "x.toml").write_text("")
    endpoint = nobody()
    started = time.monotonic()
    try:
        code = cli.main([*command, str(tmp_path / "x.toml"), "--control", endpoint, "--timeout", "0.5",
                         "--server-key", str(public)])
    except SystemExit as exit_:
        pytest.fail(f"options refused (exit {exit_.code}): {capsys.readouterr().err}")
    assert code == 1 and time.monotonic() - started < 10
    assert f"no daemon at {endpoint}" in capsys.readouterr().err
    assert 1 <= cli.build_parser().parse_args([*command, "x.toml"]).timeout <= 10


def test_keys_into_a_place_it_cannot_write_is_one_line(tmp_path, capsys):
    """`groundwatch keys` into a path under a file (or /proc, or a read-only disk) printed a traceback; into a file
    it printed "[Errno 17] File exists: 'afile'"."""
    (tmp_path / "afile").write_text("")
    for target, expected in ((tmp_path / "afile" / "keys", "cannot write the key pair"),
                             (tmp_path / "afile", "is a file, not a folder")):
        assert cli.main(["keys", str(target)]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and "Errno" not in err and expected in err and len(err.splitlines()) == 1


def test_keys_prints_the_secret_file_as_an_absolute_path(tmp_path, monkeypatch, capsys):
    """The printed config line is copied into config.toml, whose relative paths are relative to the config file,
    not to the folder `groundwatch keys` ran in."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["keys", "keys"]) == 0
    assert f'curve_secret_key_file = "{tmp_path / "keys" / "server.key_secret"}"' in capsys.readouterr().out


def test_ctrl_c_during_the_demo_says_interrupted(tmp_path, monkeypatch, capsys):
    """Ctrl-C a few seconds into `groundwatch demo` stopped the daemon, then drew a 60-frame "replay" from the 6
    frames detected, printed it as the demo's result and exited 0, as if the demo had run."""
    import streamer.daemon
    from streamer.demo import run_demo

    events = tmp_path / "recordings" / "demo" / "events.jsonl"

    class InterruptedSupervisor:
        web_url = None

        def __init__(self, config):
            self.stop_reason = None
            self.record_paths = {"demo": str(events)}

        def install_signal_handlers(self):
            pass

        def run(self, on_ready=None):
            events.parent.mkdir(parents=True)
            events.write_text("")
            self.stop_reason = "SIGINT"  # as the supervisor's handler sets it; the daemon stops in order, exit 0
            return 0

    monkeypatch.setattr(streamer.daemon, "Supervisor", InterruptedSupervisor)
    assert run_demo(tmp_path) == 130
    out = capsys.readouterr().out
    assert "interrupted" in out and str(events) in out
    assert not (tmp_path / "demo-replay.mp4").exists() and not (tmp_path / "summary.json").exists()


def test_no_answer_without_a_key_mentions_the_key(capsys):
    """A daemon bound beyond loopback answers only CURVE clients: `groundwatch status` without --server-key said
    "no daemon at ..." of a daemon that was running, with nothing pointing at the key."""
    endpoint = nobody()
    assert cli.main(["status", "--control", endpoint, "--timeout", "0.3"]) == 1
    err = capsys.readouterr().err
    assert f"no daemon at {endpoint}" in err and "--server-key" in err and len(err.splitlines()) == 1


def test_export_to_a_folder_that_is_not_there_is_refused_before_the_export(tmp_path, capsys):
    """`groundwatch export default -o missing/model.onnx` loaded and traced the model (20 s) and then said
    "[Errno 2] No such file or directory: 'missing/.model.partial-1234.onnx'", a file the user never named."""
    from gdino.cli import export_main

    started = time.monotonic()
    for output in (tmp_path / "missing" / "model.onnx", tmp_path / "afile" / "model.onnx"):
        (tmp_path / "afile").write_text("")
        assert export_main(["default", "-o", str(output)]) == 2
        err = capsys.readouterr().err
        assert ".partial" not in err and f"-o {output}" in err and str(output.parent) in err, err
    assert time.monotonic() - started < 5  # before the model loads


@pytest.mark.parametrize("argv", [["subscribe", "127.0.0.1:5555"], ["status", "--control", "127.0.0.1:5556"],
                                  ["prompt", "cam", "a cat .", "--control", "localhost:5556"],
                                  ["rules", "r.toml", "--control", "127.0.0.1:5556"]])
def test_an_endpoint_without_its_scheme_is_a_usage_error(argv, capsys):
    """`groundwatch subscribe 127.0.0.1:5555` (tcp:// left out) printed a ZMQError traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "tcp://" in err and err.strip().splitlines()[-1].startswith("groundwatch")


def test_status_says_why_a_stream_is_not_online():
    """`groundwatch status` showed a camera that could not be reached as 'reconnecting' and nothing else; the
    reason ('connection refused (nothing listening at ...)') was in the reply, shown only by --json."""
    from streamer.client import format_status

    reason = "cannot connect: connection refused (nothing listening at 127.0.0.1:8554)"
    text = format_status({"uptime": 10, "publish": "tcp://127.0.0.1:5555", "streams": {
        "cam": {"state": "reconnecting", "reason": reason, "last_error": None},
        "door": {"state": "online", "reason": None, "last_error": "decode error: corrupt frame"},
        "yard": {"state": "online", "reason": None, "last_error": None}}})
    assert f"cam: reconnecting: {reason}" in text
    assert "door: last error: decode error: corrupt frame" in text
    assert "yard:" not in text


def test_the_secret_key_is_never_readable_by_others(tmp_path, monkeypatch):
    """`groundwatch keys` wrote the secret key with the default umask (0644 here) and only then made it 0600: for
    that moment anyone on the machine could read the daemon's secret. It must be created 0600; the public key is
    for everyone."""
    import os
    import stat

    from streamer.auth import write_key_pair

    created_modes = []
    real_chmod = os.chmod

    def chmod(path, mode, *args, **kwargs):
        created_modes.append((str(path), stat.S_IMODE(os.stat(path).st_mode)))  # the mode the file was made with
        return real_chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", chmod)
    previous = os.umask(0o022)
    try:
        public, secret = write_key_pair(tmp_path / "keys")
    finally:
        os.umask(previous)
    made = dict(created_modes)
    assert made.get(str(secret), stat.S_IMODE(secret.stat().st_mode)) == 0o600, made
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
