"""How the command line starts and ends: mistakes answered before torch is imported, the demo's
fork server started before it, and a closed output or an unwritable --out answered with one
line in every command, never a traceback."""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import CLASSES, UNKNOWN, make_folder, untrained_run

import ueo.demo.runner
from ueo.bench.protocol import class_names
from ueo.cli import BROKEN_PIPE_EXIT, build_parser, main
from ueo.errors import UeoError
from ueo.files import write_text

pytestmark = pytest.mark.usefixtures("single_thread")

SRC = Path(__file__).resolve().parents[1] / "src"
CLOSED = "ueo: stopped: the output was closed (broken pipe)"


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def commands_with_out() -> set[str]:
    return {
        name
        for name, p in commands().items()
        if any("--out" in a.option_strings for a in p._actions)
    }


def _probe(code: str) -> dict:
    """Run `code` in a fresh interpreter (this checkout's ueo first on the path); it prints one
    JSON line starting with RESULT."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


# --- every simple mistake is answered before torch is imported ---------------------------------


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("startup")
    make_folder(tmp / "images", per_class=1)
    (tmp / "afile").write_text("x")
    (tmp / "classes.txt").write_text("red square\ngreen_circle\n")
    (tmp / "dup.txt").write_text("red square\nRed_Square\n")
    return tmp


def mistakes(t: Path) -> dict[str, list[str]]:
    images, afile = str(t / "images"), str(t / "afile")
    adapt = ["adapt", "--model", "RN50", "--data", images, "--classes", str(t / "classes.txt")]
    adapt += ["--out", str(t / "run")]
    bench = ["bench", "--data", images, "--all-classes", str(t / "classes.txt"), "--known", "1"]
    bench += ["--out", str(t / "sweep")]
    predict = ["predict", "--adapter", afile, "--data", images, "--out", str(t / "p.csv")]
    stream = ["stream", "--model", "RN50", "--classes", "a,b", "--data", images]
    stream += ["--out", str(t / "stream")]
    return {
        "adapt --epochs -1": adapt + ["--epochs", "-1"],
        "adapt --lr-prompt nan": adapt + ["--lr-prompt", "nan"],
        "adapt --workers -1": adapt + ["--workers", "-1"],
        "adapt --resume --overwrite": adapt + ["--resume", "--overwrite"],
        "adapt --data missing": adapt + ["--data", str(t / "nowhere")],
        "adapt --classes duplicated": adapt + ["--classes", str(t / "dup.txt")],
        "eval without --classes": ["eval", "--zeroshot", "--model", "RN50", "--data", images],
        "eval --adapter missing": ["eval", "--adapter", str(t / "nowhere"), "--data", images],
        "predict --threshold 2": predict + ["--threshold", "2"],
        "predict --out folder/": predict + ["--out", str(t / "folder") + "/"],
        "stream --batch-size 0": stream + ["--batch-size", "0"],
        "stream --threshold 2": stream + ["--threshold", "2"],
        "stream --checkpoint-every -1": stream + ["--checkpoint-every", "-1"],
        "stream --resume --overwrite": stream + ["--resume", "--overwrite"],
        "stream --data missing": stream + ["--data", str(t / "nowhere")],
        "stream --lr-norm inf": stream + ["--lr-norm", "inf"],
        "bench --known 5 alone": ["bench", "--known", "5", "--out", str(t / "sweep")],
        "bench --known 5": bench + ["--known", "5"],
        "bench --shard 2/2": bench + ["--shard", "2/2"],
        "bench --seeds 1,1": bench + ["--seeds", "1,1"],
        "bench --methods nope": bench + ["--methods", "nope"],
        "bench --dataset with --known": ["bench", "--dataset", "office31", "--root", str(t)]
        + ["--known", "3", "--out", str(t / "sweep")],
        "bench --batch-size 0": bench + ["--batch-size", "0"],
        "bench --dry-run --report-only": bench + ["--dry-run", "--report-only"],
        "prepare unknown dataset": ["prepare", "nope", "--root", str(t), "--out", str(t / "l")],
        "protocol --dataset nope": ["protocol", "--dataset", "nope", "--scenario", "ODA"],
        "demo --device ''": ["demo", "--device", "", "--out", str(t / "demo")],
        "diagnose missing run": ["diagnose", str(t / "nowhere")],
        "discover --clusters 0": ["discover", "--adapter", afile, "--data", images]
        + ["--out", str(t / "found"), "--clusters", "0"],
        "discover --vocabulary missing": ["discover", "--adapter", afile, "--data", images]
        + ["--out", str(t / "found"), "--vocabulary", str(t / "nowhere.txt")],
        "export --precision fp64": ["export", "--adapter", afile, "--out", str(t / "e")]
        + ["--precision", "fp64"],
        "export --out exists": ["export", "--adapter", afile, "--out", str(t / "images")],
        "export --adapter missing": ["export", "--adapter", str(t / "nowhere")]
        + ["--out", str(t / "e")],
    }


def unwritable_outs(t: Path) -> dict[str, list[str]]:
    """Each command with --out, with an --out that cannot be written: in /proc, under a file."""
    images, afile = str(t / "images"), str(t / "afile")
    base = {
        "adapt": ["adapt", "--model", "RN50", "--data", images, "--classes", "a,b"],
        "eval": ["eval", "--zeroshot", "--model", "RN50", "--classes", "a,b", "--data", images],
        "predict": ["predict", "--adapter", afile, "--data", images],
        "stream": ["stream", "--model", "RN50", "--classes", "a,b", "--data", images],
        "discover": ["discover", "--adapter", afile, "--data", images],
        "export": ["export", "--adapter", afile],
        "bench": ["bench", "--data", images, "--all-classes", "a,b", "--known", "1"],
        "prepare": ["prepare", "office31", "--root", str(t)],
        "demo": ["demo"],
    }
    cases = {}
    for name, argv in base.items():
        cases[f"{name} --out /proc/..."] = argv + ["--out", "/proc/ueo-nowhere/x"]
        cases[f"{name} --out under a file"] = argv + ["--out", os.path.join(afile, "x")]
    return cases


def test_the_cases_cover_every_command_that_writes(place):
    covered = {case.split()[0] for case in unwritable_outs(place)}
    assert covered == commands_with_out()


def test_simple_mistakes_are_answered_before_torch_is_imported(place):
    cases = {**mistakes(place), **unwritable_outs(place)}
    result = _probe(
        f"""
        import contextlib, io, json, sys
        from ueo.cli import main
        seen = {{}}
        for name, argv in {cases!r}.items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(argv)
            seen[name] = [code, err.getvalue().splitlines(), "torch" in sys.modules]
        print("RESULT " + json.dumps(seen))
        """
    )
    for name, (code, lines, torch_imported) in result.items():
        assert code == 2, (name, lines)
        assert len(lines) == 1 and lines[0].startswith("ueo: error: "), (name, lines)
        assert not torch_imported, f"{name}: torch was imported before the answer {lines}"


def test_a_launchers_mistakes_are_answered_before_torch_is_imported(place):
    """Under torchrun (its variables set by hand here): one GPU named for every process of a
    machine, and variables that contradict each other."""
    bench = ["bench", "--data", str(place / "images"), "--all-classes", "a,b,c", "--known", "1"]
    bench += ["--out", str(place / "sweep")]
    cases = {
        "--device cuda:0, 2 processes here": (
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
            [*bench, "--device", "cuda:0"],
        ),
        "RANK 2 of 2": ({"RANK": "2", "WORLD_SIZE": "2"}, bench),
    }
    result = _probe(
        f"""
        import contextlib, io, json, os, sys
        from ueo.cli import main
        seen = {{}}
        for name, (env, argv) in {cases!r}.items():
            os.environ.update(env)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(argv)
            for key in env:
                del os.environ[key]
            seen[name] = [code, err.getvalue().splitlines(), "torch" in sys.modules]
        print("RESULT " + json.dumps(seen))
        """
    )
    assert result["--device cuda:0, 2 processes here"][1] == [
        "ueo: error: --device cuda:0 with 2 processes on this machine: each takes "
        "cuda:LOCAL_RANK; give --device cuda or auto."
    ]
    assert result["RANK 2 of 2"][1] == [
        "ueo: error: Inconsistent launcher variables: RANK=2, WORLD_SIZE=2, LOCAL_RANK=2, "
        "LOCAL_WORLD_SIZE=2."
    ]
    assert all(code == 2 and not imported for code, _, imported in result.values())


def test_a_valid_command_does_import_torch(place):
    """The probe can fail: past its checks, a command imports torch."""
    argv = ["eval", "--zeroshot", "--model", "no-such-model", "--classes", "a,b"]
    argv += ["--data", str(place / "images")]
    result = _probe(
        f"""
        import contextlib, io, json, sys
        from ueo.cli import main
        with contextlib.redirect_stderr(io.StringIO()):
            code = main({argv!r})
        print("RESULT " + json.dumps([code, "torch" in sys.modules]))
        """
    )
    assert result == [2, True]


def test_the_demo_fork_server_starts_before_torch_is_imported(tmp_path):
    """docs/architecture.md and docs/performance.md: the parts' fork server imports ueo while
    the demo's own process does, so it must start before that process imports torch."""
    result = _probe(
        f"""
        import json, sys
        import ueo.demo.processes
        from ueo.cli import main

        def start():  # records what the process had imported when the server would start
            print("RESULT " + json.dumps({{"torch": "torch" in sys.modules}}))
            raise SystemExit(0)

        ueo.demo.processes.start_part_server = start
        main(["demo", "--quick", "--quiet", "--out", {str(tmp_path / "demo")!r}])
        print("RESULT " + json.dumps({{"started": False}}))
        """
    )
    assert result == {"torch": False}


# --- a closed output ---------------------------------------------------------------------------


class ClosedStdout:
    """Standard output whose reader has gone: every write fails as a closed pipe does."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def flush(self) -> None:
        pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A real adapter (no training) and a fake Office-31 domain for `prepare`."""
    tmp = tmp_path_factory.mktemp("closed-output")
    setup = untrained_run(tmp)
    (tmp / "all.txt").write_text("\n".join(CLASSES + UNKNOWN) + "\n")
    for name in class_names("office31"):
        make_folder(tmp / "office31" / "dslr" / "images", per_class=1, classes=[name])
    return {**setup, "tmp": tmp}


def closed_output_argv(s: dict) -> dict[str, list[str]]:
    t, fast = s["tmp"], ["--workers", "0", "--quiet", "--device", "cpu"]
    tiny = ["--model", "ueo-tiny-rn", "--pretrained", "bundled"]
    return {
        "adapt": ["adapt", *tiny, "--data", s["data"], "--classes", s["classes"]]
        + ["--epochs", "0", "--out", str(t / "adapt-run"), "--overwrite", *fast],
        "eval": ["eval", "--adapter", str(s["adapter"]), "--data", s["data"], *fast],
        "predict": ["predict", "--adapter", str(s["adapter"]), "--data", s["data"]]
        + ["--out", str(t / "p.csv"), *fast],
        "export": ["export", "--adapter", str(s["adapter"]), "--out", str(t / "export")]
        + ["--overwrite", "--quiet"],
        "stream": ["stream", *tiny, "--data", s["data"], "--classes", s["classes"]]
        + ["--out", str(t / "stream-run"), "--overwrite", "--quiet", "--device", "cpu"],
        "models": ["models"],
        "prepare": ["prepare", "office31", "--root", str(t / "office31"), "--domains", "dslr"]
        + ["--out", str(t / "lists")],
        "protocol": ["protocol", "office31", "--scenario", "ODA"],
        "bench": ["bench", "--data", s["data"], "--all-classes", str(t / "all.txt"), "--known", "1"]
        + [*tiny, "--methods", "zeroshot", "--scenarios", "CDA", "--out", str(t / "sweep"), *fast],
        "demo": ["demo", "--quick", "--quiet", "--device", "auto", "--out", str(t / "demo")],
        "diagnose": ["diagnose", str(s["adapter"])],
        "discover": ["discover", "--adapter", str(s["adapter"]), "--data", s["data"]]
        + ["--vocabulary", str(t / "all.txt"), "--threshold", "1", "--out", str(t / "found")]
        + fast,
    }


def test_every_command_is_covered_by_the_closed_output_test(runs):
    assert set(closed_output_argv(runs)) == set(commands())


@pytest.mark.parametrize("command", sorted(commands()))
def test_a_closed_output_ends_every_command_with_one_line(runs, command, monkeypatch, capsys):
    if command == "demo":  # the demo's grid takes minutes: what is checked is its printing
        results = {"mean": {"CDA": {"ueo": dict.fromkeys(("acc", "auroc", "h", "fpr95"), 0.5)}}}
        monkeypatch.setattr(ueo.demo.runner, "run_demo", lambda *a, **k: results)
    argv = closed_output_argv(runs)[command]
    monkeypatch.setattr(sys, "stdout", ClosedStdout())
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == BROKEN_PIPE_EXIT, err
    assert err[-1] == CLOSED and "Traceback" not in "\n".join(err), err


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["protocol", "visda-c", "--json"]])
def test_a_closed_pipe_in_a_real_process(argv):
    """The reader is gone before ueo writes; Python's stdout is block-buffered, as in a pipe,
    so the write fails only at the flush: one line, exit 141, no 'Exception ignored'."""
    if argv[0] == "protocol":
        argv = [*argv, "--scenario", "ODA"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ueo.cli", *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env=env,
        )
    finally:
        os.close(write)
    assert done.returncode == BROKEN_PIPE_EXIT, done.stderr
    assert done.stderr.strip().splitlines() == [CLOSED]


# --- a place that cannot be written, found while writing ----------------------------------------


def test_an_unwritable_place_is_one_line_when_writing(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UeoError, match="Cannot write .*afile/x.json"):
        write_text(afile / "x.json", "{}")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UeoError, match="Cannot write .*out.txt: No space left on device"):
        write_text(tmp_path / "out.txt", "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no temporary file left
