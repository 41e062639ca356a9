"""Every result names its software and hardware; `ueo diagnose` and the bench report say when
the results they compare differ in them."""

from __future__ import annotations

import json
import platform
import shutil

import numpy
import open_clip
import pytest
import torch

import ueo
from ueo.cli import main
from ueo.provenance import differences, environment

pytestmark = pytest.mark.usefixtures("single_thread")


def test_a_runs_metrics_name_its_versions_and_device(two_runs):
    _, runs = two_runs
    env = json.loads((runs["ueo"] / "metrics.json").read_text())["environment"]
    assert env["python"] == platform.python_version()
    assert env["torch"] == torch.__version__.split("+")[0]
    assert env["open_clip_torch"] == open_clip.__version__
    assert env["numpy"] == numpy.__version__ and env["ueo"] == ueo.__version__
    assert env["precision"] == "fp32" and env["threads"] == 1  # the fixture's one thread
    assert env["device"] and env["device"] == environment("cpu")["device"]
    # This checkout is a git repository: its commit is recorded.
    assert env["ueo_commit"] is None or len(env["ueo_commit"].split("+")[0]) == 40


def test_diagnose_says_which_runs_differ_in_their_software(two_runs, tmp_path, capsys):
    root, runs = two_runs
    edited = tmp_path / "entmin"
    shutil.copytree(runs["entmin"], edited)
    record = json.loads((edited / "metrics.json").read_text())
    record["environment"]["torch"] = "2.13.0"
    (edited / "metrics.json").write_text(json.dumps(record))
    assert main(["diagnose", str(runs["ueo"]), str(runs["entmin"])]) == 0
    assert "differ" not in capsys.readouterr().out
    assert main(["diagnose", str(runs["ueo"]), str(edited)]) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "differ" in ln]
    torch_now = json.loads((runs["ueo"] / "metrics.json").read_text())["environment"]["torch"]
    assert len(notes) == 1 and f"torch: {torch_now} (" in notes[0] and "2.13.0 (" in notes[0]
    assert main(["diagnose", str(runs["ueo"]), str(edited), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["differences"][0].startswith("torch: ")


def test_differences_name_each_value_with_its_holders():
    a = {"torch": "2.14.1", "device": "cpu X", "threads": 2}
    b = {**a, "threads": 4}
    assert differences([a, a], ["r1", "r2"]) == []
    assert differences([a, b, b, b, b], list("vwxyz"), shown=2) == [
        "CPU threads: 2 (v), 4 (w, x and 2 more)"
    ]
    assert differences([a, None], ["new", "old"]) == [
        "no record of the software (made by an older ueo): old"
    ]
