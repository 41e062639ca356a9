"""Where the demo's part processes come from: a fork server that imports ueo beside the parent.

A part process needs torch, open_clip and ueo: about 9 s of imports on a small machine.
Spawned after the parent has imported them, the parts add those seconds to the demo's time.
A fork server started first (`start_part_server`, before the command line imports torch)
imports them while the parent does, and each part is then forked from it, ready. No OpenMP
thread has run in the server, so the forked parts start with clean thread pools. Where the
platform has no fork server (Windows), parts are spawned.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
from multiprocessing.context import BaseContext

from ueo.cpus import available_cpus

PRELOAD = ["ueo.demo.runner"]  # what a part runs: run_sweep and the part's set-up


def part_context() -> BaseContext:
    """The fork server, preloading what a part runs, where the platform has one; else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def start_part_server() -> None:
    """Start the fork server now if the demo will run parts (two CPUs or more), so that its
    imports overlap the caller's."""
    if available_cpus() >= 2 and part_context().get_start_method() == "forkserver":
        multiprocessing.forkserver.ensure_running()
