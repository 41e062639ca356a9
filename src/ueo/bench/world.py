"""`ueo bench` over the processes of a torchrun world: each process computes whole cells.

A cell is one small adaptation, so the processes never exchange gradients or data: rank 0
lists the cells still missing, each process takes a contiguous part of them with its share of
the work (`ueo.bench.plan.split`) and runs it with `run_sweep` on its own device, and
torch.distributed only coordinates, over gloo whatever the device (a few integers and
strings; gloo's `monitored_barrier` names the processes that do not arrive):

* a process that fails a cell logs its error, says so in the store, and waits at the end;
  the others see it before their next cell, take no new one, and come to the end too, so a
  failure ends the whole run within one cell's time, with one line naming the rank and the
  cell; every cell already finished stays finished, and the same command computes the rest;
* a process that dies (killed, out of memory) is named at the end by the others: gloo sees
  its connections close (under torchrun its agent also stops the whole world at once); a
  process that hangs is named when the end barrier's timeout (`FINISH_TIMEOUT`) runs out;
* rank 0 alone then writes the report, from the cell folders, once every process is done.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from socket import gethostname

import torch
import torch.distributed as dist

from ueo.bench.cells import status
from ueo.bench.plan import Cell, Suite, Sweep, plan, shares
from ueo.bench.sweep import run_sweep
from ueo.cache import ImageCache
from ueo.distributed import SINGLE_PROCESS, World, join_world, process_device
from ueo.errors import UeoError
from ueo.launch import Launch, launch_from_env

log = logging.getLogger("ueo")

# How long the end barrier waits for a process that is alive but does not arrive: a process
# still computing its last cell, or one that hangs. Failing and dying processes are seen at
# once; only a hang waits this long.
FINISH_TIMEOUT = timedelta(hours=24)
# How long the processes wait for rank 0 to list the missing cells (it reads every cell's
# metrics) before giving up.
START_TIMEOUT = timedelta(hours=1)
PREFIX = "ueo-bench/"
AFTER = "the finished cells are kept: the same command computes the missing ones"


class OtherRankFailed(UeoError):
    """Another process of the world failed. `echo`: this process should say so (rank 0, for
    a process that died, hung, or failed on another machine); else the failing process said
    it on this machine's terminal, and this one ends with the same exit code in silence."""

    def __init__(self, message: str, echo: bool):
        super().__init__(message)
        self.echo = bool(echo)


class CellBoard:
    """The cells of one `ueo bench` among torchrun's processes: this process's place
    (`ueo.distributed.World`) and, in the launcher's store, which cell each process computes
    and which failed (no store for a process alone)."""

    def __init__(self, world: World = SINGLE_PROCESS):
        self.world = world
        self.store = world.store

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def size(self) -> int:
        return self.world.size

    def from_rank0(self, flags: list[bool] | None) -> list[bool]:
        """Rank 0's `flags` on every process (the others pass None, and their length is
        given by rank 0); so that every process shares out the same list."""
        if self.size == 1:
            return list(flags)
        count = torch.tensor([len(flags) if self.rank == 0 else 0], dtype=torch.int64)
        self._collective(dist.broadcast, count, "list the missing cells")
        values = torch.zeros(int(count), dtype=torch.uint8)
        if self.rank == 0:
            values[:] = torch.tensor(flags, dtype=torch.uint8)
        self._collective(dist.broadcast, values, "list the missing cells")
        return [bool(v) for v in values.tolist()]

    def _collective(self, op, tensor: torch.Tensor, what: str) -> None:
        try:
            op(tensor, src=0)
        except RuntimeError:  # a process ended (its own error says why)
            if self.rank == 0:
                raise OtherRankFailed(f"a process ended before rank 0 could {what}", True) from None
            raise OtherRankFailed(f"rank 0 ended before it could {what}", echo=False) from None

    def starting(self, cell: Cell) -> bool:
        """Before a cell: say which cell this process computes; False if a process failed."""
        if self.store is None:
            return True
        self._set(f"cell/{self.rank}", cell.name)
        return self._failures() == 0

    def fail(self, cell: str, message: str) -> None:
        """Tell every process that this one failed on `cell` (its name)."""
        if self.store is None:
            return
        with contextlib.suppress(RuntimeError):
            self.store.set(f"{PREFIX}host/{self.rank}", gethostname())
            self.store.set(f"{PREFIX}failed/{self.rank}", f"{cell}: {message}")
            self.store.add(f"{PREFIX}failures", 1)

    def finish(self) -> tuple[list[str], list[str]]:
        """Wait for every process. Returns one line per process that failed (and said so on
        its machine's terminal) and one per process that died or hung (that said nothing)."""
        if self.store is None:
            return [], []
        self._set(f"finished/{self.rank}", "1")
        try:
            dist.monitored_barrier(timeout=FINISH_TIMEOUT, wait_all_ranks=True)
            absent: list[int] = []
        except RuntimeError:  # a process died, or hung past the timeout
            absent = [r for r in range(self.size) if not self._has(f"finished/{r}")]
        failed, silent = [], []
        for r in range(self.size):
            message = self._get(f"failed/{r}")
            if message is not None:
                here = self._get(f"host/{r}") == gethostname()
                (failed if here else silent).append(f"rank {r} failed on cell {message}")
            elif r in absent:
                cell = self._get(f"cell/{r}")
                where = f" (its last cell: {cell})" if cell else ""
                silent.append(f"rank {r} died or hung before finishing its cells{where}")
        if absent and not failed + silent:  # the store is gone with its process, rank 0's
            silent.append("rank 0 ended before the others finished (see its error)")
        return failed, silent

    def _failures(self) -> int:
        try:
            return int(self.store.add(f"{PREFIX}failures", 0))
        except RuntimeError:  # the store's process (rank 0) is gone: stop as after a failure
            return 1

    def _set(self, key: str, value: str) -> None:
        with contextlib.suppress(RuntimeError):
            self.store.set(PREFIX + key, value)

    def _has(self, key: str) -> bool:
        try:
            return bool(self.store.check([PREFIX + key]))
        except RuntimeError:
            return False

    def _get(self, key: str) -> str | None:
        return self.store.get(PREFIX + key).decode() if self._has(key) else None


@contextlib.contextmanager
def cell_board(launch: Launch | None = None) -> Iterator[CellBoard]:
    """This process's board, from torchrun's variables (`launch_from_env`): alone, or one of
    a gloo process group (`ueo.distributed.join_world`), which is left at the end."""
    launch = launch or launch_from_env()
    if launch.size == 1:
        yield CellBoard()
        return
    world = join_world(launch, "gloo", START_TIMEOUT)
    try:
        yield CellBoard(world)
    finally:
        dist.destroy_process_group()


def run_share(suite: Suite, sweep: Sweep, out: Path, board: CellBoard) -> None:
    """Compute this process's share of the grid's missing cells, then wait for the others.

    Raises if any process failed (after every process stopped): `UeoError` naming the rank
    and the cell, or this process's own exception when it is not a user error."""
    cells = plan(suite, sweep)
    todo = board.from_rank0(
        [not done for _, done in status(suite, sweep, out)] if board.rank == 0 else None
    )
    missing = [c for c, m in zip(cells, todo, strict=True) if m]
    mine = shares(suite, sweep, missing, board.size)[board.rank]
    device = sweep.runtime.device
    if board.size > 1:
        device = process_device(launch_from_env(), device)
    runtime = sweep.runtime.replace(
        device=device,
        progress=sweep.runtime.progress and board.rank == 0,
    )
    log.info(
        "%d of the %d missing cells for this process (%d processes), on %s",
        len(mine),
        len(missing),
        board.size,
        runtime.device,
    )
    finished: list[Cell] = []
    error: Exception | None = None

    def failed_cell() -> str:
        return mine[len(finished)].name if len(finished) < len(mine) else "(none yet)"

    try:
        run_sweep(
            suite,
            replace(sweep, runtime=runtime),
            out,
            finished.append,
            cells=mine,
            may_start=board.starting,
            images=ImageCache(),
        )
    except KeyboardInterrupt:  # a signal (torchrun passes Ctrl-C on as SIGTERM): leave now
        board.fail(failed_cell(), "interrupted")
        raise
    except Exception as exc:
        error = exc
        log.error(
            "cell %s failed: %s (the others stop after their current cell)", failed_cell(), exc
        )
        board.fail(failed_cell(), str(exc).splitlines()[0] if str(exc) else repr(exc))
    failed, silent = board.finish()
    if isinstance(error, UeoError):
        raise UeoError(f"rank {board.rank}, cell {failed_cell()}: {error}; {AFTER}") from None
    if error is not None:
        raise error
    if failed or silent:
        problems = silent + failed
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        # Rank 0 speaks for the processes that could not say it on its terminal.
        raise OtherRankFailed(f"{problems[0]}{more}; {AFTER}", echo=board.rank == 0 and silent)
