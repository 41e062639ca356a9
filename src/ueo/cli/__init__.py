"""The `ueo` command: parses arguments, checks them, calls one Python function, prints.

Each command is one module of this package (`adapt`, `evaluate` for `ueo eval`, `predict`,
...) holding its parser (`add`), the checks of its options that need no heavy library
(`check`) and what it runs (`run`, which imports what it needs when it runs), bound to its
parser with `set_defaults`; `options` holds the options several commands share. Building the
parser and the checks import no torch, open_clip, scikit-learn or matplotlib, so that
`ueo --help` and a mistyped option are answered at once. The command line sits above the
three layers (ueo, ueo.bench, ueo.demo) and may use all of them.
"""

from __future__ import annotations

import argparse
import os
import sys

from ueo import __version__
from ueo.cli import (
    adapt,
    bench,
    demo,
    diagnose,
    discover,
    evaluate,
    export,
    models,
    predict,
    prepare,
    protocol,
    stream,
)
from ueo.errors import UeoError

COMMANDS = (
    adapt,
    evaluate,
    predict,
    export,
    stream,
    models,
    prepare,
    protocol,
    bench,
    discover,
    demo,
    diagnose,
)

BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ueo",
        description="Unsupervised universal fine-tuning of CLIP models (UEO, ICML 2024).",
    )
    parser.add_argument("--version", action="version", version=f"ueo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; no tracebacks for them.

    A command's options are checked (its `check`) before it imports torch (its `run` does).
    A closed output (`ueo models | head -0`) ends the command with one line and exit code 141.
    """
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:  # --help, --version or a usage error, printed: flushed here too
            sys.stdout.flush()
            raise
        if args.check is not None:
            args.check(args)
        code = args.run(args)
        sys.stdout.flush()  # a closed output is found here, not at the interpreter's exit
        return code
    except UeoError as exc:
        print(f"ueo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"ueo: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _output_closed()
    finally:
        if "ueo.distributed" in sys.modules:  # leave torchrun's process group cleanly
            sys.modules["ueo.distributed"].end_world()


def _output_closed() -> int:
    """The reader of stdout went away: say so on stderr and point stdout at /dev/null, so
    that Python's last flush of the unwritten output at exit does not fail a second time."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a Python caller's stream: no descriptor
        fd = None
    if fd is not None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    try:
        print("ueo: stopped: the output was closed (broken pipe)", file=sys.stderr)
    except OSError:
        pass
    return BROKEN_PIPE_EXIT
