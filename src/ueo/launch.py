"""Where torchrun (or another launcher setting its variables) put this process, read from the
environment without importing torch, so that the command line can check and say it at once.

One `ueo adapt` under torchrun splits each batch over the processes (ueo.distributed); one
`ueo bench` spreads its cells over them (ueo.bench.world). Either way, a machine's CPUs and
memory are shared by the processes it runs: `share` gives each its part.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ueo.errors import UeoError


@dataclass(frozen=True)
class Launch:
    """Where torchrun (or another launcher setting its variables) put this process: its rank
    among `size` processes, and its rank among the `local_size` ones on this machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1


def launch_from_env(env: Mapping[str, str] | None = None) -> Launch:
    """The launch torchrun describes in RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE;
    a process started without them runs alone."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return Launch()
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    given = {name: env.get(name) for name in names}
    if given["RANK"] is None or given["WORLD_SIZE"] is None:
        raise UeoError("Set both RANK and WORLD_SIZE (torchrun does), or neither.")
    given["LOCAL_RANK"] = given["LOCAL_RANK"] or given["RANK"]
    given["LOCAL_WORLD_SIZE"] = given["LOCAL_WORLD_SIZE"] or given["WORLD_SIZE"]
    try:
        rank, size, local_rank, local_size = (int(given[name]) for name in names)
    except ValueError:
        shown = ", ".join(f"{k}={v}" for k, v in given.items())
        raise UeoError(f"The launcher's variables must be integers: {shown}.") from None
    if not (0 <= rank < size and 0 <= local_rank < local_size <= size):
        shown = ", ".join(f"{k}={v}" for k, v in given.items())
        raise UeoError(f"Inconsistent launcher variables: {shown}.")
    return Launch(rank, size, local_rank, local_size)


def check_launch_device(launch: Launch, device: str) -> None:
    """Under torchrun each process takes the GPU of its local rank: one GPU named for all of
    a machine's processes would put them all on it."""
    if launch.local_size > 1 and re.fullmatch(r"\s*cuda:\d+\s*", device):
        raise UeoError(
            f"--device {device.strip()} with {launch.local_size} processes on this machine: "
            "each takes cuda:LOCAL_RANK; give --device cuda or auto."
        )


def share(amount: int, launch: Launch | None = None) -> int:
    """This process's part of a machine's `amount` (CPUs, bytes), shared by torchrun's
    processes on it."""
    launch = launch or launch_from_env()
    return amount // launch.local_size
