"""One run over several processes (ueo.distributed): N processes with B/N images each compute
the loss and gradients of one process with B images. Real gloo process groups on this CPU,
started as torchrun starts them (its environment variables), and the real `torchrun`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import CLASSES, make_folder
from safetensors.torch import load_file, save_file

from ueo.recipe import Recipe, Runtime

pytestmark = pytest.mark.usefixtures("single_thread")

SRC = Path(__file__).resolve().parents[1] / "src"
TORCHRUN = Path(sys.executable).with_name("torchrun")
QUIET = Runtime(device="cpu", workers=0, progress=False)
BASE = Recipe(epochs=2, batch_size=8, lr_prompt=1e-2, lr_norm=1e-2)
# 30 images: batches of 8, 8, 8 and a last one of 6 (parts of 3 and 3).
CONFIGS = {
    f"{method}-{augment}": BASE.replace(method=method, augment=augment)
    for method in ("ueo", "infomax", "entmin", "pouf", "upl")
    for augment in ("default", "none")
}
# Batches of 29 and 1: the second process's part of the last batch is empty.
CONFIGS["ueo-empty-part"] = BASE.replace(batch_size=29)
CONFIGS["upl-default"] = CONFIGS["upl-default"].replace(upl_k=4)  # a subset: 4 per class
CONFIGS["upl-none"] = CONFIGS["upl-none"].replace(upl_k=4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_configs(folder: Path, out: Path, names: list[str]) -> None:
    """adapt() for each configuration; the main process writes tensors and metrics."""
    from ueo.adaptation import adapt
    from ueo.api import load_model
    from ueo.data import load_image_set
    from ueo.distributed import current_world

    images = load_image_set(folder, CLASSES)
    for name in names:
        recipe = CONFIGS[name]
        model = load_model("ueo-tiny-rn", "bundled", CLASSES, recipe)
        result = adapt(model, images, recipe, QUIET)
        if current_world().main:
            save_file(model.adapter_state(), str(out / f"{name}.safetensors"))
            record = {"metrics": result.metrics, "threshold": result.threshold}
            record["losses"] = [h["loss"] for h in result.history]
            (out / f"{name}.json").write_text(json.dumps(record))


def as_torchrun_process(rank: int, size: int, port: int) -> None:
    """The variables torchrun would set for process `rank` of `size` on this machine; one
    thread, as the two processes share the test's CPUs."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)


def worker(rank: int, size: int, port: int, folder: str, out: str, names, per_shard: bool):
    """One process of a world of `size`, with the variables torchrun would set."""
    as_torchrun_process(rank, size, port)
    import ueo.distributed
    import ueo.training

    if per_shard:  # the control: each process's loss on its own part, gradients summed
        step = ueo.training.Trainer.step

        def own_part(self, images, parts, where):
            alone = [p if r == self.world.rank else [] for r, p in enumerate(parts)]
            return step(self, images, alone, where)

        ueo.training.Trainer.step = own_part
    ueo.distributed.start_world("cpu")
    try:
        run_configs(Path(folder), Path(out), names)
    finally:
        ueo.distributed.end_world()


def in_processes(size, folder, out, names, per_shard=False) -> None:
    out.mkdir(parents=True)
    args = (size, free_port(), str(folder), str(out), names, per_shard)
    mp.spawn(worker, args=args, nprocs=size, join=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every configuration in one process and in two, plus the per-shard control."""
    root = tmp_path_factory.mktemp("distributed")
    folder = root / "images"
    make_folder(folder)  # 30 images: 4 known classes and 1 unknown
    names = list(CONFIGS)
    (root / "one").mkdir()
    run_configs(folder, root / "one", names)
    in_processes(2, folder, root / "two", names)
    in_processes(2, folder, root / "control", ["ueo-default", "pouf-default"], per_shard=True)
    return root


def load(root: Path, name: str):
    return load_file(str(root / f"{name}.safetensors")), json.loads(
        (root / f"{name}.json").read_text()
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_give_the_one_process_run(runs, name):
    (one, one_record), (two, two_record) = load(runs / "one", name), load(runs / "two", name)
    start = load_file(str(runs / "one" / f"{name}.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=0, msg=k)
    assert two_record["metrics"] == one_record["metrics"]
    assert two_record["threshold"] == pytest.approx(one_record["threshold"], abs=1e-6)
    assert two_record["losses"] == pytest.approx(one_record["losses"], rel=1e-5, abs=1e-6)
    assert start.keys() == one.keys()


@pytest.mark.parametrize("name", ["ueo-default", "pouf-default"])
def test_the_loss_of_each_part_alone_is_another_objective(runs, name):
    """The control: without the gathered batch the adapter moves elsewhere (the check above
    can fail)."""
    (one, _), (alone, _) = load(runs / "one", name), load(runs / "control", name)
    assert max(float((alone[k] - one[k]).abs().max()) for k in one) > 1e-4


def test_training_moved_the_tensors(runs):
    from ueo.api import load_model

    start = load_model("ueo-tiny-rn", "bundled", CLASSES).adapter_state()
    tuned, _ = load(runs / "one", "ueo-default")
    assert max(float((tuned[k] - start[k]).abs().max()) for k in start) > 1e-3


# --- the command line under torchrun ----------------------------------------------------------

BUNDLED = ["--model", "ueo-tiny-rn", "--pretrained", "bundled"]


def ueo_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(n: int, *argv, **kwargs) -> subprocess.Popen:
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={n}", "-m", "ueo", *argv]
    return subprocess.Popen(
        cmd, env=ueo_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def adapt_argv(folder, out, *extra) -> list[str]:
    argv = ["adapt", *BUNDLED, "--data", str(folder), "--classes", ",".join(CLASSES)]
    return [*argv, "--out", str(out), "--workers", "0", "--quiet", *extra]


def tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter.safetensors"))


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "images"
    make_folder(folder, per_class=4)
    return folder


TRAIN = ["--epochs", "3", "--batch-size", "6", "--lr-prompt", "1e-2", "--lr-norm", "1e-2"]


@pytest.fixture(scope="module")
def single_run(cli_folder, tmp_path_factory):
    from ueo.cli import main

    out = tmp_path_factory.mktemp("single") / "run"
    assert main(adapt_argv(cli_folder, out, *TRAIN)) == 0
    return out


def assert_the_single_process_run(out: Path, single_run: Path) -> None:
    """A run of two processes: the tensors of one process's run to 1e-6, the same metrics."""
    one, two = tensors(single_run), tensors(out)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=0, msg=k)
    a = json.loads((single_run / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert b["adapted"] == a["adapted"] and b["processes"] == 2


def test_torchrun_adapt_writes_the_single_process_run(cli_folder, single_run, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(2, *adapt_argv(cli_folder, out, *TRAIN))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert stdout.count("adapted unlabeled") == 1  # the table, printed once, by process 0
    assert_the_single_process_run(out, single_run)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single_run.iterdir())


def test_two_machines_run_once_as_one_process(cli_folder, single_run, tmp_path):
    """docs/distributed.md's several-machines path: two `torchrun --nnodes 2` launchers, one
    process each, meeting at a c10d rendezvous on localhost (as two machines would at the
    first one's address), write the run of a single process."""
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    launchers = [
        subprocess.Popen(
            [str(TORCHRUN), "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d"]
            + [f"--rdzv_endpoint={endpoint}", "--rdzv_id=ueo-two-machines", "--max_restarts=0"]
            + ["-m", "ueo", *adapt_argv(cli_folder, out, *TRAIN)],
            env=ueo_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in launchers]
    for p, (_, stderr) in zip(launchers, outputs, strict=True):
        assert p.returncode == 0, stderr
    assert sum(o.count("adapted unlabeled") for o, _ in outputs) == 1  # process 0's table
    assert_the_single_process_run(out, single_run)


def test_a_killed_process_ends_the_run_and_resume_finishes_it(cli_folder, single_run, tmp_path):
    """kill -9 of process 1 mid-run: the run ends, with torchrun naming the process; the same
    command with --resume (here on one process: the state does not depend on their number)
    ends equal to the uninterrupted run."""
    out = tmp_path / "run"
    argv = adapt_argv(cli_folder, out, *TRAIN)
    proc = torchrun(2, *argv)
    checkpoint = out.parent / f".{out.name}.partial" / "checkpoint.safetensors"
    deadline = time.monotonic() + 300
    while not checkpoint.is_file():  # the end of epoch 1
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.2)
    workers = subprocess.run(  # torchrun's children
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False
    )
    victim = next(int(p) for p in workers.stdout.split() if _rank_of(int(p)) == "1")
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "rank" in stderr.lower() and "1" in stderr
    assert not (out / "adapter.safetensors").exists()
    from ueo.cli import main

    assert main([*argv, "--resume"]) == 0
    one, resumed = tensors(single_run), tensors(out)
    for k in one:
        torch.testing.assert_close(resumed[k], one[k], atol=1e-6, rtol=0, msg=k)


def _rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e[5:].decode() for e in environ if e.startswith(b"RANK=")]
    return found[0] if found else None


def infer_worker(rank: int, size: int, port: int, folder: str, out: str):
    as_torchrun_process(rank, size, port)
    import numpy as np

    import ueo.distributed

    ueo.distributed.start_world("cpu")
    try:
        outputs, _ = passes(Path(folder))
        np.savez(Path(out) / f"rank{rank}.npz", cos=outputs.cos, valid=outputs.valid)
    finally:
        ueo.distributed.end_world()


def passes(folder: Path):
    """A zero-shot pass over a set with an unreadable image, by batches of 4."""
    from ueo.api import load_model
    from ueo.data import load_image_set
    from ueo.inference import infer
    from ueo.loader import BadImages

    images = load_image_set(folder, CLASSES)
    bad = BadImages()
    model = load_model("ueo-tiny-rn", "bundled", CLASSES)
    outputs = infer(model, images, QUIET.replace(eval_batch_size=4), bad=bad)
    return outputs, len(bad)


def test_a_pass_split_over_processes_gives_every_image_once(tmp_path):
    """Evaluation, zero-shot and predict passes: each process takes a contiguous part, every
    process gets the whole set's outputs (the unreadable image invalid everywhere, once), no
    padding counted."""
    import numpy as np

    folder = tmp_path / "images"
    make_folder(folder, per_class=3)  # 15 images: parts of 8 and 7
    (folder / "red_square" / "broken.png").write_bytes(b"not an image")
    one, skipped = passes(folder)
    out = tmp_path / "two"
    out.mkdir()
    mp.spawn(infer_worker, args=(2, free_port(), str(folder), str(out)), nprocs=2, join=True)
    assert skipped == 1 and (~one.valid).sum() == 1
    for rank in (0, 1):
        with np.load(out / f"rank{rank}.npz") as z:
            np.testing.assert_array_equal(z["valid"], one.valid)
            np.testing.assert_allclose(z["cos"], one.cos, atol=1e-6, rtol=0)
