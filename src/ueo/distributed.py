"""One run over many processes, as `torchrun` starts them: the same UEO at any world size.

UEO's loss couples a batch (the entropy of its weighted mean prediction), so a process that
computed it on its own part of a batch would optimise another objective. Here every process
takes one contiguous part of each global batch (`ueo.loader.EpochOrder`), computes the cosines
of its part, and then every process computes the loss of the *whole* batch from the gathered
cosines (`BatchPart.gather`): the other processes' rows as values, its own with their gradient.
The gradients of the tuned tensors are then summed over the processes (`World.sum_`), which
gives each process the gradient a single process computes on the whole batch, to float
rounding, and keeps every process's tensors equal. No DistributedDataParallel: the tuned
tensors are a few hundred kilobytes, summed in one call per step, and DDP's bucketing, buffer
broadcasts and its refusal of a module whose parameters are all frozen would only get in the way.

Host-side agreement (the readable images of each part, a signal to stop) goes through a gloo
group on the CPU, so that it never waits for the GPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ueo.errors import UeoError
from ueo.launch import Launch, check_launch_device, launch_from_env

log = logging.getLogger("ueo")

TIMEOUT = datetime.timedelta(minutes=10)  # a peer that stops answering ends the run


@dataclass
class World:
    """This process's place among the processes of one run (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    cpu_group: object = field(default=None, repr=False)
    store: object = field(default=None, repr=False)  # torchrun's key-value store, this attempt's

    @property
    def main(self) -> bool:
        """Whether this process writes files, draws progress bars and prints results."""
        return self.rank == 0

    def exchange(self, values: list[int]) -> list[list[int]]:
        """Every process's list of integers, in rank order (on the CPU, never waiting for a
        GPU): which images of a batch each process could read, a stop request, ..."""
        if self.size == 1:
            return [list(values)]
        length = torch.tensor([len(values)], dtype=torch.long)
        counts = [int(c) for c in _all_gather_rows(length, [1] * self.size, self.cpu_group)]
        parts = _all_gather_rows(torch.tensor(values, dtype=torch.long), counts, self.cpu_group)
        return [p.tolist() for p in parts]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the processes, in place (the tuned tensors' gradients)."""
        if self.size > 1:
            with _peers():
                dist.all_reduce(tensor)
        return tensor

    def gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """The processes' row blocks of an array, concatenated in rank order (on the CPU):
        the parts of an evaluation pass."""
        if self.size == 1:
            return rows
        counts = [c[0] for c in self.exchange([len(rows)])]
        parts = _all_gather_rows(torch.from_numpy(rows), counts, self.cpu_group)
        return np.concatenate([p.numpy() for p in parts])

    def anyone(self, flag: bool) -> bool:
        """Whether `flag` holds in any process (a stop asked for by a signal)."""
        return any(p[0] for p in self.exchange([flag]))

    def everyone(self, flag: bool) -> bool:
        """Whether `flag` holds in every process (finite outputs)."""
        return all(p[0] for p in self.exchange([flag]))

    def share_batch(self, stop: bool, indices: list[int]) -> BatchParts:
        """What each process holds of a batch, and whether any was asked to stop: the one
        exchange of a training step, on the CPU."""
        parts = self.exchange([stop, *indices])
        return BatchParts(any(p[0] for p in parts), [p[1:] for p in parts])

    def barrier(self) -> None:
        if self.size > 1:
            with _peers():
                dist.barrier(group=self.cpu_group)

    def agree(self, ok: bool, what: str) -> None:
        """Go on only if every process is `ok`; the others stop with one line naming the first
        process that is not (which reports its own error)."""
        if self.size == 1:
            return
        flags = [p[0] for p in self.exchange([ok])]
        if ok and not all(flags):
            bad = flags.index(0)
            raise UeoError(f"Process {bad} of {self.size} stopped {what}; its error says why.")


SINGLE_PROCESS = World()


@dataclass(frozen=True)
class BatchParts:
    """A training batch as the processes hold it: each one's dataset indices (a part may be
    empty: an unreadable image, a short last batch), and whether a signal asked any to stop."""

    stop: bool
    indices: list[list[int]]

    @property
    def empty(self) -> bool:
        return not any(self.indices)


def _all_gather_rows(rows: torch.Tensor, counts: list[int], group=None) -> list[torch.Tensor]:
    """Every process's rows, in rank order, process r holding `counts[r]` of them: padded to
    the longest part for `all_gather`, which needs equal shapes, and cut back after."""
    local = rows.new_zeros((max(counts), *rows.shape[1:]))
    local[: len(rows)] = rows
    parts = [torch.empty_like(local) for _ in counts]
    with _peers():
        dist.all_gather(parts, local, group=group)
    return [p[:c] for p, c in zip(parts, counts, strict=True)]


@contextmanager
def _peers() -> Iterator[None]:
    """A collective call whose peer is gone (killed, failed, unreachable) ends this process
    with one line, not a traceback: the failed process, or torchrun's summary, says why."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError, DistNetworkError and gloo's own
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UeoError(
            f"Lost another process of the run ({first}); the run stopped. Its last checkpoint "
            "is kept: the same command with --resume continues it."
        ) from None


def on_main(world: World, fn, what: str):
    """`fn()` on the main process only (preparing or writing files), the others waiting for
    it: an error there stops every process, with one line each."""
    result, error = None, None
    if world.main:
        try:
            result = fn()
        except UeoError as exc:
            error = exc
    world.agree(error is None, what)
    if error is not None:
        raise error
    return result


def current_world() -> World:
    """The world this process belongs to: torchrun's, once `start_world` has joined it."""
    return _WORLD


_WORLD = SINGLE_PROCESS


def start_world(device: str) -> tuple[World, str]:
    """Join the run's processes (torchrun's environment variables, `ueo.launch`), once;
    returns the world and this process's device (`process_device`). A process launched alone
    runs alone, without a process group.

    NCCL carries the GPU's collectives, gloo the CPU's and every host-side agreement.
    """
    global _WORLD
    launch = launch_from_env()
    if launch.size == 1:
        return SINGLE_PROCESS, device
    device = process_device(launch, device)
    cuda = device.startswith("cuda")
    if _WORLD.size == 1:
        _WORLD = join_world(launch, "nccl" if cuda else "gloo", TIMEOUT, device if cuda else None)
    return _WORLD, device


def join_world(
    launch: Launch, backend: str, timeout: datetime.timedelta, device: str | None = None
) -> World:
    """This process in torchrun's process group (`backend`; `device`: NCCL's GPU), with a
    gloo group for the CPU's agreements. Each attempt of a world torchrun restarts
    (--max-restarts) gets keys of its own in the launcher's store, which keeps those of the
    attempt before (the old processes' addresses)."""
    store = None
    if not dist.is_initialized():  # else joined already, by the caller
        unset = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if unset:
            needs = " and ".join(unset)
            raise UeoError(f"WORLD_SIZE={launch.size} needs {needs} (torchrun sets them).")
        try:
            store, rank, size = next(dist.rendezvous("env://"))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"attempt{attempt}/", store)
            kwargs = {"device_id": torch.device(device)} if device else {}
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=size, timeout=timeout, **kwargs
            )
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UeoError(
                f"Rank {launch.rank} could not join the other processes: {first}"
            ) from None
    cpu = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return World(launch.rank, launch.size, launch.local_rank, cpu, store)


def process_device(launch: Launch, device: str) -> str:
    """This process's device among torchrun's: `cuda`, and `auto` with GPUs, are
    cuda:LOCAL_RANK; `cuda:N` (one process on its machine) is that GPU; either is made the
    current device. Any other device (cpu) is every process's."""
    check_launch_device(launch, device)
    device = device.strip()
    if not (device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())):
        return device
    if not torch.cuda.is_available():
        raise UeoError(f"--device {device} was asked for but no CUDA GPU is available.")
    if ":" in device:
        torch.cuda.set_device(torch.device(device))
        return device
    return local_cuda(launch)


def local_cuda(launch: Launch) -> str:
    """`cuda:LOCAL_RANK`, this process's GPU among its machine's, made the current device."""
    if launch.local_rank >= torch.cuda.device_count():
        raise UeoError(
            f"Process {launch.rank} has LOCAL_RANK {launch.local_rank}, but this machine has "
            f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU "
            "(--nproc_per_node)."
        )
    torch.cuda.set_device(launch.local_rank)
    return f"cuda:{launch.local_rank}"


def end_world() -> None:
    """Leave the process group (at the end of a command)."""
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = SINGLE_PROCESS


@dataclass(frozen=True)
class BatchPart:
    """One process's part of a global batch: the rows every process holds, in rank order."""

    world: World
    counts: list[int]

    @property
    def start(self) -> int:
        return sum(self.counts[: self.world.rank])

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The global batch's rows: the other processes' as values, this process's own rows
        with their gradient (so each process's backward pass reaches its part only)."""
        parts = _all_gather_rows(rows.detach(), self.counts)
        parts[self.world.rank] = rows
        return torch.cat(parts)


class _ScaleGradient(torch.autograd.Function):
    """The identity whose gradient is scaled: a tensor every process computes in full."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def replicated(x: torch.Tensor, world: World) -> torch.Tensor:
    """`x`, computed in full by every process (the text features), for a loss that every
    process computes: its gradient is divided by the world size, so that the sum over the
    processes is the gradient of one process."""
    return _ScaleGradient.apply(x, 1.0 / world.size) if world.size > 1 else x
