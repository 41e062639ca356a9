"""Where ueo's messages go: the terminal, a run's log.txt, nowhere (open_clip's). Torch-free.

Everything ueo says goes through the `ueo` logger; per-epoch lines through `ueo.epochs`, which
a sweep keeps off the terminal (they still reach each cell's log.txt).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from ueo.launch import launch_from_env

LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
EPOCHS = "ueo.epochs"  # the logger of per-epoch lines


def setup_logging(quiet: bool, epochs: bool = True) -> None:
    """Log to stderr; `epochs=False` keeps per-epoch lines of sweeps off the terminal. Under
    torchrun each process says its rank, and only rank 0 says more than warnings."""
    launch = launch_from_env()
    log = logging.getLogger("ueo")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LOG_FORMAT)
    if launch.size > 1:
        marked = f"%(asctime)s %(levelname)s rank {launch.rank}: %(message)s"
        handler.setFormatter(logging.Formatter(marked, LOG_FORMAT.datefmt))
    if quiet or launch.rank > 0:
        handler.setLevel(logging.WARNING)
    if not epochs:
        handler.addFilter(lambda record: record.name != EPOCHS)
    log.addHandler(handler)
    log.propagate = False


@contextlib.contextmanager
def captured_log(name: str = "ueo") -> Iterator[io.StringIO]:
    """What `name` and its children log (INFO and up) while the block runs: a run's log.txt."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(LOG_FORMAT)
    logger = logging.getLogger(name)
    level = logger.level
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield buffer
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def logged_to(path: Path, header: str = "") -> Iterator[None]:
    """Append what the `ueo` logger says to `path` as it happens (a run's log.txt), and an
    error or an interrupt that ends the block: the log survives a kill and says why it ended."""
    logger = logging.getLogger("ueo")
    with open(path, "a", encoding="utf-8") as f:
        f.write(header)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(LOG_FORMAT)
    handler.setLevel(logging.INFO)
    level = logger.level
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    except KeyboardInterrupt as exc:
        _to_file(handler, logging.WARNING, f"interrupted: {exc or 'KeyboardInterrupt'}")
        raise
    except BaseException as exc:
        _to_file(
            handler,
            logging.ERROR,
            f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
        )
        raise
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def _to_file(handler: logging.Handler, level: int, message: str) -> None:
    """A line for the log file only: the terminal gets the error from the command line."""
    handler.handle(logging.LogRecord("ueo", level, __file__, 0, message, None, None))


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """Silence open_clip's messages, which go to the root logger (and, with no handler there,
    make `logging` install one on stderr): ueo says what matters in its own words."""
    root = logging.getLogger()
    level = root.level
    silence = logging.NullHandler()
    root.addHandler(silence)
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.removeHandler(silence)
        root.setLevel(level)
