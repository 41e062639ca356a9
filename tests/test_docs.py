"""The docs against the code: every CLI option documented, every code block that can run
offline run (the convention: docs/architecture.md), and the figures the docs state about the
command line and the demo's grid computed from the code."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest
from docblocks import DOCS, LANGUAGES, ROOT, all_blocks, exec_block

from ueo.bench.plan import Domain, Suite, Sweep, plan
from ueo.bench.protocol import DATASETS, PAPER_SCENARIOS
from ueo.cli import build_parser
from ueo.data import ImageSet
from ueo.demo.runner import demo_methods, demo_recipe
from ueo.demo.testbed import DOMAINS
from ueo.methods import get_method
from ueo.recipe import Recipe

DOC_DIR = ROOT / "docs"
BLOCKS = all_blocks()
SHELL_PRELUDE = 'ueo() { "$UEO_PYTHON" -m ueo.cli "$@"; }\n'


def test_every_cli_option_is_documented():
    text = (DOC_DIR / "cli.md").read_text()
    parser = build_parser()
    missing = [o for a in parser._actions for o in a.option_strings if f"`ueo {o}" not in text]
    missing = [o for o in missing if o not in ("-h", "--help")]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        if f"`ueo {name}" not in text:
            missing.append(f"ueo {name}")
        for action in command._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help" and f"`{option}" not in text:
                    missing.append(f"ueo {name} {option}")
    assert not missing, f"undocumented in docs/cli.md: {missing}"


# --- code blocks ------------------------------------------------------------------------------


def test_the_docs_have_code_blocks_of_every_kind():
    """The parser sees the blocks (a test that finds none would pass on anything)."""
    assert len(DOCS) >= 10
    kinds = {b.lang for b in BLOCKS if b.runs}
    assert {"python", "console"} <= kinds, kinds


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.where)
def test_every_code_block_follows_the_convention(block):
    assert block.lang in LANGUAGES, f"{block.where}: a fenced block names its language"
    if block.marker and block.marker.startswith("not run"):
        assert re.fullmatch(r"not run: \S.*", block.marker), f"{block.where}: give a reason"
        assert block.lang != "text", f"{block.where}: a text block is never run anyway"
    elif block.marker and block.marker.startswith("run in"):
        assert block.lang == "python", block.where


def _env() -> dict:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": src + (os.pathsep + path if path else ""),
        "HF_HUB_OFFLINE": "1",
        "UEO_PYTHON": sys.executable,
    }


def _shell(script: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", SHELL_PRELUDE + script],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _console_steps(code: str) -> list[tuple[str, list[str]]]:
    steps: list[tuple[str, list[str]]] = []
    for line in code.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"output before the first command: {line!r}"
            steps[-1][1].append(line)
    return steps


def _run_python(block, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    if block.marker and block.marker.startswith("run in "):
        module = importlib.import_module(block.marker.removeprefix("run in ").strip())
        for name, value in vars(module).items():
            if isinstance(value, dict) and name.isupper():  # registries: restored afterwards
                monkeypatch.setattr(module, name, dict(value))
    exec_block(block)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.runs], ids=lambda b: b.where)
def test_runnable_code_blocks_run(block, tmp_path, monkeypatch):
    if block.lang == "python":
        _run_python(block, tmp_path, monkeypatch)
    elif block.lang == "sh":
        done = _shell(block.code, tmp_path)
        assert done.returncode == 0, f"{block.where}\n{done.stdout}\n{done.stderr}"
    else:
        for command, expected in _console_steps(block.code):
            done = _shell(command, tmp_path)
            assert done.returncode == 0, f"{block.where}: {command}\n{done.stderr}"
            got = [line.rstrip() for line in done.stdout.rstrip("\n").splitlines()]
            assert got == [line.rstrip() for line in expected], f"{block.where}: {command}"


def test_console_blocks_name_real_commands():
    """Each `$ ueo ...` line of the docs parses (a typo in a not-run block is caught too)."""
    parser = build_parser()
    for block in BLOCKS:
        joined = block.code.replace("\\\n", " ").splitlines()  # continuation lines joined
        lines = [ln[2:] for ln in joined if ln.startswith("$ ueo ")]
        if block.lang == "sh":
            lines = [ln for ln in joined if ln.startswith("ueo ")]
        for line in lines:
            words = shlex.split(line.split("|")[0].split("#")[0])[1:]
            if "..." in words or any(w.startswith("$") for w in words):
                continue  # an elided or shell-variable example
            try:
                parser.parse_args(words)
            except SystemExit:
                pytest.fail(f"{block.where}: `ueo {' '.join(words)}` does not parse")


# --- figures the docs state ---------------------------------------------------------------------


def test_the_docs_count_the_demo_grid_as_the_code_plans_it():
    """README, demo.md and performance.md: '112 cells, 96 of them training runs'."""
    empty = ImageSet([], [], "")
    names = [f"class{i}" for i in range(15)]
    suite = Suite(
        "testbed",
        names,
        [Domain(name, empty, empty) for name, _, _ in DOMAINS],
        {s: {"known": [0], "unlabeled": [0], "test": [0]} for s in PAPER_SCENARIOS},
    )
    sweep = Sweep("ueo-tiny-rn", "bundled", recipe=demo_recipe(), methods=demo_methods())
    cells = plan(suite, sweep)
    training = sum(get_method(c.method).trains for c in cells)
    stated = set()
    for name in ("README.md", "docs/demo.md", "docs/performance.md"):
        text = " ".join((ROOT / name).read_text().split())
        found = re.findall(r"(\d+) cells, (\d+) of (?:them|which)", text)
        assert found, name
        stated |= {(int(a), int(b)) for a, b in found}
    assert stated == {(len(cells), training)} == {(112, 96)}


def test_bench_help_states_each_datasets_default_epochs(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    default = Recipe().epochs
    assert f"(default: the dataset's recipe, {default};" in text
    for name, info in DATASETS.items():
        if info.epochs != default:
            assert f"{name} {info.epochs}" in text
    assert "(default 50)" not in text.split("--epochs", 1)[1].split("--batch-size")[0]
