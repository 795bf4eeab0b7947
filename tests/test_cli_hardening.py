"""The `groundwatch` client commands with nothing to talk to, and the help a new user reads (issue 11, CLI).

`status` and `prompt` used to wait 60 s and `subscribe` forever without a word when no daemon was there;
`groundwatch eval` without arguments started a four-minute run; the bundled config asked the bundled video for a
"green triangle" it does not hold.
"""

from __future__ import annotations

import argparse
import time
import tomllib

import pytest

from streamer import cli
from streamer.demo import DEMO_CONFIG, DEMO_FPS, DEMO_FRAMES, DEMO_SEED, DEMO_SIZE, DEMO_VIDEO

from daemon_harness import REPO
from rtsp_server import free_port


def nobody() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.mark.parametrize("argv", [["status"], ["prompt", "cam", "a person ."]])
def test_status_and_prompt_say_there_is_no_daemon(argv, capsys):
    """Both used to wait 60 s (prompt had no --timeout at all) and then print a generic timeout."""
    endpoint = nobody()
    started = time.monotonic()
    assert cli.main([*argv, "--control", endpoint, "--timeout", "0.5"]) == 1
    assert time.monotonic() - started < 10
    assert f"no daemon at {endpoint}" in capsys.readouterr().err


def test_status_and_prompt_default_timeout_is_a_few_seconds():
    parser = cli.build_parser()
    for argv in (["status"], ["prompt", "cam", "x"]):
        assert 1 <= parser.parse_args(argv).timeout <= 10


def test_subscribe_to_nothing_says_so(capsys):
    """A subscriber connected to an endpoint where nothing listens used to wait in silence forever."""
    endpoint = nobody()
    assert cli.main(["subscribe", endpoint, "--connect-timeout", "0.3", "--timeout", "1.5"]) == 1
    assert f"no daemon at {endpoint}" in capsys.readouterr().err


def test_eval_without_arguments_prints_usage(capsys):
    """`groundwatch eval` with no arguments used to start a four-minute evaluation."""
    started = time.monotonic()
    assert cli.main(["eval"]) == 2
    assert time.monotonic() - started < 60  # importing torch on a loaded machine, not an evaluation
    captured = capsys.readouterr()
    assert "usage: groundwatch eval" in captured.out and "--weights" in captured.out
    assert "groundwatch eval --weights default" in captured.err


def test_every_subcommand_and_option_is_described():
    parser = cli.build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    assert set(helps) == set(commands.choices)
    for name, sub in commands.choices.items():
        assert helps[name], f"{name} has no one-line help"
        assert sub.description and len(sub.description) > 20, f"{name} has no description"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"groundwatch {name} {action.dest} has no help"


def _phrases(prompt: str) -> set[str]:
    return {p.strip() for p in prompt.split(".") if p.strip()}


def test_bundled_prompts_name_what_the_bundled_video_holds():
    """config.toml asked the bundled video for a "green triangle" (and red circles, blue squares) while its
    ground truth holds green stars, black crosses, purple squares, black rings."""
    from gdino.shapes import render_video

    _, truth = render_video(DEMO_SEED, DEMO_FRAMES, DEMO_SIZE, DEMO_FPS)
    present = {category for frame in truth for category in frame.categories}
    config = tomllib.loads((REPO / "config.toml").read_text())
    demo = tomllib.loads(DEMO_CONFIG.read_text())
    assert (REPO / config["streams"][0]["url"]).resolve() == DEMO_VIDEO.resolve()
    for prompt in (config["streams"][0]["prompt"], demo["streams"][0]["prompt"]):
        phrases = _phrases(prompt)
        assert phrases <= present, f"{prompt!r} asks for {phrases - present}, not in the video ({present})"
        assert "green star" in phrases  # in every frame of the video
