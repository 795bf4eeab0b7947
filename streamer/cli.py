"""The `groundwatch` command.

    groundwatch demo                      the bundled video through the default model: events, recording, replay
    groundwatch run [config.toml]         the daemon
    groundwatch subscribe ENDPOINT [--stream ID] [--kind KIND]    one JSON line per event
    groundwatch status [--control ENDPOINT]                       per-stream fps, latency, drops, reconnects
    groundwatch prompt STREAM PROMPT [--control ENDPOINT]         change a stream's prompt while it runs
    groundwatch zones STREAM FILE.toml [--control ENDPOINT]       replace a stream's [[zones]] and [[lines]]
    groundwatch rules FILE.toml [--control ENDPOINT]              replace every [[rules]] while it runs
    groundwatch replay VIDEO --events LOG -o out.mp4              overlays and trails drawn over the video
    groundwatch redact VIDEO --prompt "face ." -o out.mp4          blur (pixelate, fill, inpaint) what words describe
    groundwatch keys DIRECTORY                                    a CURVE key pair for non-loopback endpoints
    groundwatch search PATH... --prompt "white van" [-o out.json]  time ranges where it appears, contact sheet
    groundwatch detect|convert|export|train|eval ...              the model's own tools (gdino)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

DEFAULT_CONTROL = "tcp://127.0.0.1:5556"


def _endpoint(text: str) -> str:
    """An argparse type: a ZeroMQ endpoint (`tcp://host:port`, `ipc://path`); `host:port` alone is a usage error
    that shows the fix, not ZeroMQ's traceback."""
    if "://" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a ZeroMQ endpoint; did you mean tcp://{text} ?")
    return text


def _configure_logging() -> None:
    import os

    logging.basicConfig(level=os.environ.get("GROUNDWATCH_LOG", "INFO").upper(),
                        format="%(asctime)s supervisor %(levelname)s %(message)s", stream=sys.stderr)


def _run(args) -> int:
    from streamer.config import ConfigError, load_config
    from streamer.daemon import StartupError, Supervisor

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"groundwatch: bad configuration\n{exc}", file=sys.stderr)
        return 2
    if getattr(args, "cluster", None):  # --cluster ADDRESS: the config's [cluster] with this address
        config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"address": args.cluster})})
    _configure_logging()
    supervisor = Supervisor(config)
    supervisor.install_signal_handlers()

    def announce(s: Supervisor) -> None:
        print(f"groundwatch: events on {config.publish.endpoint} (subscribe: groundwatch subscribe "
              f"{config.publish.endpoint}); control on {config.publish.control_endpoint}", flush=True)
        if s.web_url:
            print(f"groundwatch: console at {s.web_url}", flush=True)
        if s.metrics_url:
            print(f"groundwatch: metrics at {s.metrics_url}", flush=True)
        for stream, path in s.record_paths.items():
            print(f"groundwatch: recording {stream} to {path}", flush=True)

    try:
        code = supervisor.run(on_ready=announce)
    except StartupError as exc:
        print(f"groundwatch: {exc}", file=sys.stderr)
        return 2
    print(f"groundwatch: stopped ({supervisor.stop_reason})", flush=True)
    return code


def _demo(args) -> int:
    from streamer.demo import run_demo

    return run_demo(output_directory=args.output, weights=args.weights, stay=args.stay)


def _server_key(args, command: str) -> bytes | None:
    """The `--server-key` option: None, or the key; raises SystemExit(2) with a message when unusable."""
    if not getattr(args, "server_key", None):
        return None
    from streamer.auth import KeyFileError, load_public

    try:
        return load_public(args.server_key)
    except KeyFileError as exc:
        print(f"groundwatch {command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _no_daemon(command: str, exc: TimeoutError, args) -> None:
    # A daemon bound beyond loopback answers only clients holding its key: without one it looks absent.
    hint = "" if args.server_key else "; one serving beyond loopback answers only with its key (--server-key)"
    print(f"groundwatch {command}: {exc}{hint}", file=sys.stderr)


def _subscribe(args) -> int:
    from streamer.client import GapCounter, subscribe

    gaps = GapCounter()
    received = 0
    server_key = _server_key(args, "subscribe")

    def silence(message: str) -> None:
        print(f"groundwatch subscribe: {message}", file=sys.stderr, flush=True)

    try:
        for event in subscribe(args.endpoint, args.stream, args.kind, timeout=args.timeout, count=args.count,
                               gaps=gaps, server_key=server_key, connect_timeout=args.connect_timeout,
                               on_silence=silence):
            received += 1
            sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        return 0
    if gaps.lost and not args.kind:
        print(f"groundwatch subscribe: {gaps.lost} events lost (this subscriber fell behind)", file=sys.stderr)
    return 0 if received or args.timeout is None else 1


def _status(args) -> int:
    from streamer.client import format_status, status

    try:
        reply = status(args.control, timeout=args.timeout, server_key=_server_key(args, "status"))
    except TimeoutError as exc:
        _no_daemon("status", exc, args)
        return 1
    print(json.dumps(reply, indent=2) if args.json else format_status(reply))
    return 0


def _prompt(args) -> int:
    from streamer.client import set_prompt

    try:
        reply = set_prompt(args.control, args.stream, args.prompt, timeout=args.answer_timeout,
                           server_key=_server_key(args, "prompt"), reachable_timeout=args.timeout)
    except TimeoutError as exc:
        _no_daemon("prompt", exc, args)
        return 1
    print(json.dumps(reply))
    return 0 if reply.get("ok") else 1


def _read_toml(path: str, command: str) -> dict | None:
    from streamer.config import ConfigError, read_toml

    try:
        return read_toml(path)
    except ConfigError as exc:
        print(f"groundwatch {command}: {exc}", file=sys.stderr)
    return None


def _zones(args) -> int:
    from streamer.client import set_zones

    data = _read_toml(args.file, "zones")
    if data is None:
        return 2
    unknown = set(data) - {"zones", "lines"}
    if unknown:
        print(f"groundwatch zones: {args.file}: unknown tables {sorted(unknown)} (only [[zones]] and [[lines]])",
              file=sys.stderr)
        return 2
    try:
        reply = set_zones(args.control, args.stream, data.get("zones", []), data.get("lines", []),
                          server_key=_server_key(args, "zones"), reachable_timeout=args.timeout)
    except TimeoutError as exc:
        _no_daemon("zones", exc, args)
        return 1
    print(json.dumps(reply) if reply.get("ok") else reply.get("error"))
    return 0 if reply.get("ok") else 1


def _rules(args) -> int:
    from streamer.client import set_rules

    data = _read_toml(args.file, "rules")
    if data is None:
        return 2
    unknown = set(data) - {"rules"}
    if unknown:
        print(f"groundwatch rules: {args.file}: unknown tables {sorted(unknown)} (only [[rules]])", file=sys.stderr)
        return 2
    try:
        reply = set_rules(args.control, data.get("rules", []), server_key=_server_key(args, "rules"),
                          reachable_timeout=args.timeout)
    except TimeoutError as exc:
        _no_daemon("rules", exc, args)
        return 1
    for warning in reply.get("warnings", []):
        print(f"groundwatch rules: warning: {warning}", file=sys.stderr)
    print(json.dumps(reply) if reply.get("ok") else reply.get("error"))
    return 0 if reply.get("ok") else 1


def _replay(args) -> int:
    from streamer.replay import ReplayError, replay

    for path in (args.video, args.events):
        if not Path(path).is_file():
            print(f"groundwatch replay: no such file {path}", file=sys.stderr)
            return 2
    try:
        summary = replay(args.video, args.events, args.output, trail_length=args.trail, progress=not args.quiet,
                         force=args.force)
    except ReplayError as exc:
        print(f"groundwatch replay: {exc}", file=sys.stderr)
        return 2
    for warning in summary.warnings:
        print(f"groundwatch replay: warning: {warning}", file=sys.stderr)
    print(f"groundwatch replay: {summary.frames} frames, {summary.frames_with_events} with events, "
          f"{summary.boxes_drawn} boxes drawn -> {summary.output}")
    return 0


def _redact(args) -> int:
    from streamer.editing.redact import main as redact_main

    return redact_main(args)


def _search(args) -> int:
    from streamer.editing.search import SearchError, SearchOptions, Searcher, check_writable, write_results

    output = Path(args.output)
    sheet = None if args.no_sheet else Path(args.sheet) if args.sheet else output.with_suffix(".jpg")
    try:
        options = SearchOptions(fps=args.fps, box_threshold=args.threshold, text_threshold=args.text_threshold,
                                merge_gap=args.merge_gap, min_hits=args.min_hits, refine=not args.no_refine,
                                top=args.top)
        from streamer.prompts import prompt_problem

        if prompt_problem(args.prompt):
            raise SearchError(prompt_problem(args.prompt))
        if sheet is not None and (sheet.resolve() == output.resolve()):
            raise SearchError(f"the results -o {output} and the contact sheet {sheet} would be the same file; "
                              "give -o a .json name, or --sheet another file")
        for path in [output] + ([sheet] if sheet is not None else []):
            check_writable(path)
        from streamer.editing.search import VideoFile, collect_sources

        # Missing or undecodable files are found now, before the model loads (minutes on a long list).
        problems, sources = [], collect_sources(args.paths)
        for path in [output] + ([sheet] if sheet is not None else []):
            for source in sources:  # a typo must not replace a recording with the results
                if path.resolve() == source.path.resolve() or (path.exists() and os.path.samefile(path, source.path)):
                    raise SearchError(f"{path} would overwrite the searched video {source.path}; choose another "
                                      f"{'-o' if path == output else '--sheet'}")
        for source in sources:
            try:
                VideoFile(source.path)
            except SearchError as exc:
                problems.append(str(exc))
        if len(problems) == len(sources):
            raise SearchError("; ".join(problems))
        import gdino
        from gdino.checkpoint import CheckpointError

        try:
            model = gdino.load(args.weights, device=args.device)
        except (CheckpointError, OSError) as exc:
            raise SearchError(f"cannot load the model {args.weights!r}: {exc}") from None
        searcher = Searcher(model, cache_dir=args.cache_dir, use_cache=not args.no_cache, progress=not args.quiet)
        result = searcher.search(args.paths, args.prompt, options)
        write_results(result, output, sheet)
    except SearchError as exc:
        print(f"groundwatch search: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("groundwatch search: interrupted (what was detected is cached: the same search resumes)",
              file=sys.stderr)
        return 130
    for report in result.errors:
        print(f"groundwatch search: skipped {report.error}", file=sys.stderr)
    for item in result.ranges:
        print(f"{item.file}\t{item.start:.2f}-{item.end:.2f} s\t{item.phrase}\t{item.score:.2f}")
    cached = sum(r.status == "cached" for r in result.files)
    print(f"groundwatch search: {len(result.ranges)} ranges in {len(result.files) - len(result.errors)} files"
          f"{f' ({cached} from the cache)' if cached else ''} -> {output}"
          f"{f', {sheet}' if sheet is not None else ''}", file=sys.stderr)
    return 1 if result.errors else 0


def _keys(args) -> int:
    from streamer.auth import write_key_pair

    directory = Path(args.directory)
    try:
        public, secret = write_key_pair(directory, args.name)
    except OSError as exc:
        if exc.filename is None:  # ours: a pair is there already
            message = str(exc)
        elif directory.exists() and not directory.is_dir():
            message = f"{directory} is a file, not a folder"
        else:
            message = f"cannot write the key pair into {directory}: {exc.strerror or exc}"
        print(f"groundwatch keys: {message}", file=sys.stderr)
        return 1
    # Absolute: relative paths in config.toml are relative to the config file, not to this folder.
    print(f"groundwatch keys: public key {public} (give it to clients: --server-key {public})")
    print(f"groundwatch keys: secret key {secret} (the daemon's; [publish] curve_secret_key_file = "
          f"\"{secret.resolve()}\")")
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    # Imported only here: the daemon's commands work whether or not the model's tools are installed.
    if command in ("detect", "convert", "export"):
        from gdino import cli as gdino_cli

        entry = {"detect": gdino_cli.detect_main, "convert": gdino_cli.convert_main,
                 "export": gdino_cli.export_main}[command]
    else:
        from gdino.train import cli as train_cli

        entry = train_cli.train_main if command == "train" else train_cli.eval_main
    if command == "eval" and not argv:
        # With every default, eval is a run of minutes; nobody should start one by asking what the command does.
        try:
            entry(["--help"])
        except SystemExit:
            pass
        print("\ngroundwatch eval: choose what to evaluate, e.g. `groundwatch eval --weights default` "
              "(minutes on a CPU)", file=sys.stderr)
        return 2
    if command == "eval":
        from tracker.evaluation import score_videos

        return int(entry(argv, score_tracking=score_videos) or 0)
    return int(entry(argv) or 0)


def _control_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a command that asks the running daemon over its control socket and waits for it."""
    parser.add_argument("--control", default=DEFAULT_CONTROL, type=_endpoint,
                        help=f"control endpoint (default {DEFAULT_CONTROL})")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds to wait for the daemon before saying there is none (default 5)")
    parser.add_argument("--server-key", help="the daemon's public CURVE key (a .key file or its 40 characters)")


def build_parser() -> argparse.ArgumentParser:
    from streamer.events import EVENT_KINDS  # json and time only

    parser = argparse.ArgumentParser(prog="groundwatch", description="Watch video for objects described in words.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the bundled video through the default model",
                               description="Run the bundled shapes video through the daemon with the default "
                                           "model, print the events it published, and draw them over the video.")
    demo.add_argument("-o", "--output", default="runs/demo", help="where the recording and replay go")
    demo.add_argument("--weights", default="default", help="model weights ('default', 'tiny' or a path)")
    demo.add_argument("--stay", action="store_true", help="keep the daemon and its web console up after the video "
                      "(until Ctrl-C)")
    demo.set_defaults(handler=_demo)

    run = commands.add_parser("run", help="run the daemon",
                              description="Run the daemon: decode every stream of the config, detect and track "
                                          "what its prompt names, publish events and record them.")
    run.add_argument("config", nargs="?", default="config.toml", help="TOML config (default: config.toml)")
    run.add_argument("--cluster", metavar="ADDRESS",
                     help="run the stages on a Ray cluster: 'auto', 'host:port' or 'ray://host:port' "
                          "(sets [cluster] address; docs/cluster.md)")
    run.set_defaults(handler=_run)

    sub = commands.add_parser("subscribe", help="print events as JSON lines",
                              description="Print the daemon's events as JSON lines (schema: docs/events.md). "
                                          "A new subscriber first gets each stream's last status and error.")
    sub.add_argument("endpoint", type=_endpoint, help="the daemon's PUB endpoint, e.g. tcp://127.0.0.1:5555")
    sub.add_argument("--stream", help="only this stream")
    sub.add_argument("--kind", choices=EVENT_KINDS, help="only this kind")
    sub.add_argument("--count", type=int, help="exit after this many events")
    sub.add_argument("--timeout", type=float, help="exit after this many seconds without an event")
    sub.add_argument("--connect-timeout", type=float, default=5.0,
                     help="say so on stderr when no daemon answered within this many seconds (default 5)")
    sub.add_argument("--server-key", help="the daemon's public CURVE key (a .key file or its 40 characters); "
                                          "needed when the daemon serves beyond loopback")
    sub.set_defaults(handler=_subscribe)

    stat = commands.add_parser("status", help="per-stream fps, latency, drops, reconnects",
                               description="Ask a running daemon for its per-stream figures and processes.")
    _control_arguments(stat)
    stat.add_argument("--json", action="store_true", help="the full reply as JSON")
    stat.set_defaults(handler=_status)

    prompt = commands.add_parser("prompt", help="change a stream's prompt while the daemon runs",
                                 description="Change what a stream looks for while the daemon runs; tracks of "
                                             "phrases the new prompt keeps go on, those of phrases that left it end "
                                             "(reason prompt_changed).")
    prompt.add_argument("stream", help="the stream id from the config")
    prompt.add_argument("prompt", help="what to look for, phrases separated by ' . ', e.g. 'a person . a car .'")
    _control_arguments(prompt)
    prompt.add_argument("--answer-timeout", type=float, default=60.0,
                        help="seconds a reachable daemon may take to encode the prompt and answer (default 60)")
    prompt.set_defaults(handler=_prompt)

    zones = commands.add_parser("zones", help="replace a stream's zones and lines while the daemon runs",
                                description="Replace one stream's zones and counting lines while the daemon runs, "
                                            "validated like the config (every problem is listed); the next frame "
                                            "uses them.")
    zones.add_argument("stream", help="the stream id from the config")
    zones.add_argument("file", help="TOML with [[zones]] and [[lines]] tables, as under [[streams]] in the config")
    _control_arguments(zones)
    zones.set_defaults(handler=_zones)

    rules = commands.add_parser("rules", help="replace every rule while the daemon runs",
                                description="Replace every alert rule while the daemon runs, validated like the "
                                            "config; a rule whose phrase is in no prompt is a warning, not an "
                                            "error. The next frame uses them.")
    rules.add_argument("file", help="TOML with [[rules]] tables, as in the config")
    _control_arguments(rules)
    rules.set_defaults(handler=_rules)

    rep = commands.add_parser("replay", help="draw recorded events over a video",
                              description="Draw a recording's events (boxes, phrases, scores, track ids, trails) "
                                          "over its video into a new video.")
    rep.add_argument("video", help="the video the events were made from (a file, or a recorded .ts segment)")
    rep.add_argument("--events", required=True, help="the stream's event log (.jsonl)")
    rep.add_argument("-o", "--output", required=True, help="output video (.mp4)")
    rep.add_argument("--trail", type=int, default=20, help="trail length in frames")
    rep.add_argument("--quiet", action="store_true", help="no progress bar")
    rep.add_argument("--force", action="store_true",
                     help="draw a log that does not match the video (another frame shape, more frames)")
    rep.set_defaults(handler=_replay)

    redact = commands.add_parser("redact", help="blur, pixelate, fill or remove what words describe in a video",
                                 description="Redact what a prompt describes in every frame of a video: the "
                                             "detector's boxes, followed by the tracker through its misses and a "
                                             "few frames beyond each track's ends. Audio, frame count and "
                                             "timestamps are kept; the output appears only once complete.")
    from streamer.editing.redact import add_arguments as redact_arguments

    redact_arguments(redact)
    redact.set_defaults(handler=_redact)

    search = commands.add_parser("search", help="find when what words describe appears in videos",
                                 description="Search video files or a recordings folder for what the prompt "
                                             "describes: sampled frames through the detector, hits grouped "
                                             "into time ranges by the tracker, each range's start and end refined "
                                             "at the full frame rate. Writes a JSON of ranges and a contact sheet "
                                             "of each range's best frame. Results are cached per file and prompt: "
                                             "a repeated search is instant, an interrupted one resumes.")
    search.add_argument("paths", nargs="+", metavar="PATH", help="video files or folders (a recordings folder: "
                                                                 "its segments, with wall-clock times)")
    search.add_argument("--prompt", required=True, help="what to find, e.g. 'white van' or 'red car . person .'")
    search.add_argument("-o", "--output", default="search.json", help="the JSON of ranges (default search.json)")
    search.add_argument("--sheet", help="the contact sheet image (default: the output's name with .jpg)")
    search.add_argument("--no-sheet", action="store_true", help="no contact sheet")
    search.add_argument("--fps", type=float, default=2.0, help="frames sampled per second of video (default 2)")
    search.add_argument("--top", type=int, help="keep the K ranges with the best scores")
    search.add_argument("--threshold", type=float, default=0.35, help="box score threshold (default 0.35)")
    search.add_argument("--text-threshold", type=float, default=0.25, help="phrase token threshold (default 0.25)")
    search.add_argument("--merge-gap", type=float, default=1.0,
                        help="sightings of one phrase closer than this many seconds are one range (default 1)")
    search.add_argument("--min-hits", type=int, default=2,
                        help="sampled frames with a hit a range needs (default 2; 1 keeps one-sample sightings)")
    search.add_argument("--no-refine", action="store_true", help="ranges at the sampling rate only")
    search.add_argument("--weights", default="default", help="model weights ('default' or a path)")
    search.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    search.add_argument("--cache-dir", help="where results and sampled frames are cached "
                                            "(default ~/.cache/groundwatch/search)")
    search.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    search.add_argument("--quiet", action="store_true", help="no progress bar")
    search.set_defaults(handler=_search)

    keys = commands.add_parser("keys", help="write a CURVE key pair for endpoints beyond loopback",
                               description="Write a ZeroMQ CURVE key pair: DIRECTORY/NAME.key (public, for "
                                           "clients' --server-key) and DIRECTORY/NAME.key_secret (the daemon's "
                                           "[publish] curve_secret_key_file). Needed to bind beyond loopback.")
    keys.add_argument("directory", help="where to write the pair (created if missing)")
    keys.add_argument("--name", default="server", help="file name stem (default: server)")
    keys.set_defaults(handler=_keys)

    for name, help_text in (("detect", "detect objects in images (gdino)"), ("convert", "convert checkpoints"),
                            ("export", "export the model to ONNX"),
                            ("train", "train the model"), ("eval", "evaluate the model")):
        delegated = commands.add_parser(name, help=help_text, add_help=False,
                                        description=f"{help_text[0].upper()}{help_text[1:]}: "
                                                    f"`groundwatch {name} --help` lists its options.")
        delegated.add_argument("args", nargs=argparse.REMAINDER, help=f"options of groundwatch {name}")
        delegated.set_defaults(handler=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("detect", "convert", "export", "train", "eval"):
            return _delegate(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of wherever it landed
        print(f"\n{' '.join(['groundwatch'] + argv[:1])}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `groundwatch status --json | head`: the reader has what it wanted
        # stdout's buffer still holds unwritable bytes; point it at /dev/null so the exit's flush stays quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
