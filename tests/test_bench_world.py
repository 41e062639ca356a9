"""`ueo bench` over several processes: torchrun worlds of 2 gloo processes on this CPU, and
jobs of a scheduler (`--shard`) merged by `--report-only`.

The worlds are real: `python -m torch.distributed.run` (torchrun) starts
tests/bench_world_driver.py, which is `ueo` plus what a test must count or provoke in each
process (which cells it computes; a cell that fails, kills its process or hangs)."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, UNKNOWN, make_folder
from safetensors.torch import load_file

from ueo.bench.scores import load_scores
from ueo.bench.world import AFTER
from ueo.cli import main
from ueo.errors import UeoError
from ueo.launch import Launch, check_launch_device, launch_from_env

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Model .* has RANDOM weights"),
]

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
DRIVER = TESTS / "bench_world_driver.py"
CELLS = [
    f"images/{s}/{m}/seed{seed}"
    for s in ("CDA", "ODA")
    for m in ("zeroshot", "ueo")
    for seed in (1, 2)
]


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> dict:
    """A labelled folder (3 known classes of 5) and the options of a grid of 8 cells of the
    bundled tiny model, trained hard enough that adapting changes the numbers."""
    tmp = tmp_path_factory.mktemp("world")
    make_folder(tmp / "images", per_class=4)
    (tmp / "all.txt").write_text("\n".join(CLASSES + UNKNOWN) + "\n")
    args = ["bench", "--data", str(tmp / "images"), "--all-classes", str(tmp / "all.txt")]
    args += ["--known", "3", "--model", "ueo-tiny-rn", "--pretrained", "bundled"]
    args += ["--scenarios", "CDA,ODA", "--methods", "zeroshot,ueo", "--seeds", "1,2"]
    args += ["--epochs", "2", "--batch-size", "8", "--lr-prompt", "0.05", "--lr-norm", "0.05"]
    args += ["--workers", "0", "--device", "cpu", "--quiet"]
    return {"tmp": tmp, "args": args}


def environment(extra: dict) -> dict:
    """This checkout's ueo first on the path, offline, one thread per process (torchrun's
    default for several processes, so a process alone computes as they do)."""
    return {
        **os.environ,
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def run(
    args: list[str],
    processes: int,
    env: dict | None = None,
    torchrun: bool = True,
    restarts: int = 0,
):
    """`ueo` (the driver) in `processes` processes of one torchrun world (which torchrun
    starts again up to `restarts` times when it fails), or in one process started directly."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
        launcher += [str(processes), "--max-restarts", str(restarts)]
    return subprocess.run(
        [*launcher, str(DRIVER), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment(env or {}),
    )


def counted(folder: Path) -> dict[str, list[str]]:
    """Which cells each rank computed, from the driver's files."""
    return {p.stem: p.read_text().split() for p in sorted(folder.glob("rank*.txt"))}


def table(out: Path) -> list[dict]:
    """results.csv without the wall times, which differ from run to run."""
    with open(out / "results.csv") as f:
        return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in csv.DictReader(f)]


def adapters(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {c: load_file(out / "runs" / c / "adapter.safetensors") for c in CELLS}


def test_two_processes_give_the_table_of_one_each_cell_computed_once(grid):
    tmp, args = grid["tmp"], grid["args"]
    one, two = tmp / "one", tmp / "two"
    for folder in (one / "count", two / "count"):
        folder.mkdir(parents=True)
    alone = run([*args, "--out", str(one)], 1, {"UEO_TEST_COUNT_DIR": str(one / "count")}, False)
    assert alone.returncode == 0, alone.stderr
    world = run([*args, "--out", str(two)], 2, {"UEO_TEST_COUNT_DIR": str(two / "count")})
    assert world.returncode == 0, world.stderr

    assert sorted(counted(one / "count")["rank0"]) == sorted(CELLS)
    done = counted(two / "count")
    assert set(done) == {"rank0", "rank1"} and all(done.values())  # both processes worked
    assert sorted(done["rank0"] + done["rank1"]) == sorted(CELLS)  # every cell, once
    # Shares of equal work: CDA's cells cost less than ODA's (fewer unlabeled images).
    assert done["rank0"] == CELLS[:6] and done["rank1"] == CELLS[6:]

    # The same numbers: the table, the report and every tuned tensor, bit for bit.
    assert table(one) == table(two)
    assert (one / "results.md").read_text() == (two / "results.md").read_text()
    summary = [json.loads((o / "results.json").read_text()) for o in (one, two)]
    assert summary[0] == summary[1] and summary[1]["missing"] == []
    first, second = adapters(one), adapters(two)
    for cell in CELLS:
        assert first[cell].keys() == second[cell].keys()
        assert all(torch.equal(first[cell][k], second[cell][k]) for k in first[cell]), cell
        scores = [load_scores(o / "runs" / cell) for o in (one, two)]
        for key, values in scores[0].items():
            np.testing.assert_array_equal(values, scores[1][key], err_msg=f"{cell} {key}")
        if "/ueo/" in cell:  # training changed the scores: the equality above is not vacuous
            assert not np.array_equal(scores[1]["adapted_score"], scores[1]["zeroshot_score"])
    # Only rank 0 reported; rank 1's terminal said nothing but the launcher's banner.
    assert world.stdout.count("## ODA — AUROC") == 1

    # Resumed: only the missing cells are computed, one in each process's share.
    gone = [done["rank0"][0], done["rank1"][-1]]
    for cell in gone:
        for path in (two / "runs" / cell).iterdir():
            path.unlink()
        (two / "runs" / cell).rmdir()
    for path in (two / "count").iterdir():
        path.unlink()
    again = run([*args, "--out", str(two)], 2, {"UEO_TEST_COUNT_DIR": str(two / "count")})
    assert again.returncode == 0, again.stderr
    assert sorted(sum(counted(two / "count").values(), [])) == sorted(gone)
    assert len(counted(two / "count")) == 2  # shared out again: one cell each
    assert table(one) == table(two)


def test_a_failing_process_ends_the_run_with_one_line(grid, capsys):
    """Rank 1 fails its second cell: both processes stop (rank 0 after its current cell),
    one line names the rank and the cell, the finished cells stay. torchrun then starts the
    world again (--max-restarts 1): it computes only the missing cells, and fails again."""
    tmp, args = grid["tmp"], grid["args"]
    out = tmp / "failing"
    (out / "count").mkdir(parents=True)
    env = {"UEO_TEST_COUNT_DIR": str(out / "count"), "UEO_TEST_FAIL_HOW": "error"}
    env["UEO_TEST_FAIL_CELL"] = CELLS[7]
    done = run([*args, "--out", str(out)], 2, env, restarts=1)
    assert done.returncode != 0
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("ueo: error:")]
    line = f"ueo: error: rank 1, cell {CELLS[7]}: injected failure; {AFTER}"
    assert errors == [line, line], done.stderr  # one line per attempt
    assert f"ERROR rank 1: cell {CELLS[7]} failed: injected failure" in done.stderr
    assert str(SRC) not in done.stderr  # no traceback through ueo (torchrun prints its own)
    computed = counted(out / "count")
    assert computed["rank1"] == CELLS[6:]
    first = computed.get("rank0", []) + [CELLS[6]]  # what the first attempt finished
    second = computed.get("rank0.attempt1", []) + computed["rank1.attempt1"]
    assert computed["rank1.attempt1"][-1] == CELLS[7] and not set(first) & set(second)
    kept = [c for c in CELLS if (out / "runs" / c / "metrics.json").is_file()]
    assert sorted(kept + [CELLS[7]]) == sorted(first + second)  # each finished cell once
    assert not (out / "results.md").exists()

    # What the same command would compute: the missing cells only (resuming is tested above).
    assert main([*args, "--out", str(out), "--dry-run"]) == 0
    listed = capsys.readouterr().out.splitlines()[:-1]
    assert [ln.split()[0] for ln in listed] == ["done" if c in kept else "todo" for c in CELLS]


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_dead_or_hung_process_is_named_with_its_cell(grid, how):
    """Rank 1 dies in its first cell (two processes given torchrun's variables by hand:
    torchrun's agent would stop the world itself) or hangs there (under torchrun, whose
    agent stops it once rank 0 gives up): rank 0 finishes its share, then names rank 1 and
    its cell, at once or when the end barrier's timeout runs out. Nothing waits forever."""
    tmp, args = grid["tmp"], grid["args"]
    out = tmp / how
    env = {"UEO_TEST_FAIL_CELL": CELLS[6], "UEO_TEST_FAIL_HOW": how}
    if how == "hang":
        done = run([*args, "--out", str(out)], 2, {**env, "UEO_TEST_FINISH_TIMEOUT": "3"})
        assert done.returncode != 0
        stderr = done.stderr
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        env |= {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs = [
            subprocess.Popen(
                [sys.executable, str(DRIVER), *args, "--out", str(out)],
                env=environment({**env, "RANK": str(r), "LOCAL_RANK": str(r)}),
                stderr=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
                text=True,
            )
            for r in range(2)
        ]
        stderr = procs[0].communicate(timeout=300)[1]
        assert procs[1].wait(timeout=60) == 9  # died in its cell
        assert procs[0].returncode == 2
    errors = [ln for ln in stderr.splitlines() if ln.startswith("ueo: error:")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(
        f"ueo: error: rank 1 died or hung before finishing its cells (its last cell: {CELLS[6]})"
    )
    assert all((out / "runs" / c / "metrics.json").is_file() for c in CELLS[:6])  # rank 0's


# --- jobs of a scheduler: --shard, then one report -------------------------------------------


def test_shards_then_one_report_naming_what_is_missing(image_folder, tmp_path, capsys):
    classes = tmp_path / "all.txt"
    classes.write_text("\n".join(CLASSES + UNKNOWN) + "\n")
    out = tmp_path / "sweep"
    args = ["bench", "--data", str(image_folder), "--all-classes", str(classes), "--known", "3"]
    args += ["--model", "test-tiny-rn", "--pretrained", "none", "--epochs", "1"]
    args += ["--scenarios", "CDA,ODA", "--methods", "zeroshot,ueo", "--seeds", "1"]
    args += ["--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet"]
    args += ["--out", str(out)]
    assert main([*args, "--report-only"]) == 2
    assert "No cell of this grid is finished" in capsys.readouterr().err

    assert main([*args, "--shard", "0/2"]) == 0
    first = json.loads((out / "results.json").read_text())
    missing = first["missing"]
    assert missing and len(missing) < 4
    assert all(not (out / "runs" / c).exists() for c in missing)
    md = (out / "results.md").read_text()
    assert f"**Incomplete**: {len(missing)} of the grid's 4 cells have no result yet" in md
    assert f"missing: {', '.join(missing)}" in capsys.readouterr().err

    stamp = (out / "results.md").stat().st_mtime_ns
    assert main([*args, "--report-only"]) == 0  # the same report, nothing computed
    assert json.loads((out / "results.json").read_text()) == first
    assert not any((out / "runs" / c).exists() for c in missing)
    assert (out / "results.md").stat().st_mtime_ns != stamp

    assert main([*args, "--shard", "1/2"]) == 0  # the last job reports the whole grid
    whole = json.loads((out / "results.json").read_text())
    assert whole["missing"] == [] and "Incomplete" not in (out / "results.md").read_text()
    assert set(whole["mean"]["ODA"]) == {"zeroshot", "ueo"}


def test_a_dry_run_under_torchrun_says_which_process_computes_each_cell(
    image_folder, tmp_path, monkeypatch, capsys
):
    classes = tmp_path / "all.txt"
    classes.write_text("\n".join(CLASSES + UNKNOWN) + "\n")
    args = ["bench", "--data", str(image_folder), "--all-classes", str(classes), "--known", "3"]
    args += ["--model", "test-tiny-rn", "--pretrained", "none", "--epochs", "1"]
    args += ["--scenarios", "CDA,ODA", "--methods", "zeroshot,ueo", "--seeds", "1"]
    args += ["--out", str(tmp_path / "sweep"), "--dry-run"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    owners = [ln.split()[:3] for ln in lines[:4]]
    assert owners == [["todo", "rank", "0"]] * 2 + [["todo", "rank", "1"]] * 2  # CDA, ODA
    assert lines[-1] == "0/4 cells complete"
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 0 and capsys.readouterr().out == ""  # rank 0 says it for all


# --- torchrun's variables, read without torch -------------------------------------------------


def test_the_launch_is_read_from_torchruns_variables():
    assert launch_from_env({}) == Launch()
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert launch_from_env(env) == Launch(5, 8, 1, 4)
    assert launch_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == Launch(1, 2, 1, 2)
    for bad in (
        {"RANK": "0"},
        {"RANK": "2", "WORLD_SIZE": "2"},
        {"RANK": "x", "WORLD_SIZE": "2"},
        {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"},
    ):
        with pytest.raises(UeoError, match="RANK"):
            launch_from_env(bad)
    check_launch_device(Launch(1, 2, 1, 2), "cuda")
    check_launch_device(Launch(1, 2, 0, 1), "cuda:1")  # one process on its machine
    with pytest.raises(UeoError, match="cuda:LOCAL_RANK"):
        check_launch_device(Launch(1, 2, 1, 2), "cuda:0")
