"""`ueo diagnose`: runs compared by their label-free scores, end to end on tiny runs; the
verdict line and its wording; the measured sureness is the one docs/diagnostics.md shows."""

import json
import re
import shutil
from pathlib import Path

import pytest

from ueo.cli import main
from ueo.diagnose import RANK_BY, SURENESS, compare_runs, relative_gap, verdict
from ueo.errors import UeoError
from ueo.reports import metrics_table

DOCS = Path(__file__).resolve().parents[1] / "docs"

pytestmark = pytest.mark.usefixtures("single_thread")


def test_diagnose_keeps_the_best_candidate_by_the_ranking_score(two_runs, capsys):
    root, runs = two_runs
    assert main(["diagnose", str(runs["ueo"]), str(runs["entmin"])]) == 0
    text = capsys.readouterr().out
    records = {m: json.loads((p / "metrics.json").read_text()) for m, p in runs.items()}
    values = {m: r["label_free"]["adapted"][RANK_BY] for m, r in records.items()}
    values["zero-shot"] = records["ueo"]["label_free"]["zeroshot"][RANK_BY]
    best = max(values, key=values.get)
    keep = next(line for line in text.splitlines() if line.startswith("keep:"))
    if best == "zero-shot":
        assert "the zero-shot model" in keep
    else:
        assert keep.startswith(f"keep: {best} ({best}, epoch 3)")
    second = sorted(values.values())[-2]
    gap = relative_gap(values[best], second)
    assert f"{gap:.1f}% above the next" in keep and "pairs" in keep
    ranked = [line.split()[1] for line in text.splitlines()[2:5]]
    assert ranked == sorted(values, key=values.get, reverse=True)

    # A folder of runs stands for every run below it; --json gives the same choice.
    assert main(["diagnose", str(root / "runs"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["keep"]["name"] == ("zero-shot" if best == "zero-shot" else best)
    assert len(result["ranked"]) == 3 and result["rank_by"] == RANK_BY
    # each run's intermediate evaluations are scored too: a peak before the end is reported
    for peak in result["peaks"]:
        curves = records[peak["method"]]["curves"]
        assert any(c["epoch"] == peak["epoch"] for c in curves[1:-1])
        assert peak["scores"][RANK_BY] > values[peak["method"]]


def test_diagnose_reads_runs_without_importing_torch(two_runs, capsys):
    """Ranking runs reads their JSON only: in a fresh interpreter `ueo diagnose` answers, the
    same table as in this process, and torch was never imported."""
    import os
    import subprocess
    import sys

    root, runs = two_runs
    argv = ["diagnose", str(runs["ueo"]), str(runs["entmin"])]
    assert main(argv) == 0
    expected = capsys.readouterr().out
    src = str(Path(__file__).resolve().parents[1] / "src")
    code = (
        "import sys\nfrom ueo.cli import main\n"
        f"code = main({argv!r})\n"
        "print('TORCH', 'torch' in sys.modules, code)\n"
    )
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    out, last = done.stdout.rsplit("TORCH", 1)
    assert last.split() == ["False", "0"]
    assert out == expected


def test_diagnose_refuses_runs_on_other_data_and_non_runs(two_runs, tmp_path, capsys):
    _, runs = two_runs
    other = tmp_path / "other"
    shutil.copytree(runs["entmin"], other)
    record = json.loads((other / "metrics.json").read_text())
    record["identity"]["unlabeled"] = "0" * 64
    (other / "metrics.json").write_text(json.dumps(record))
    assert main(["diagnose", str(runs["ueo"]), str(other)]) == 2
    assert "not adapted on the same unlabeled images" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(UeoError, match="holds no ueo run"):
        compare_runs([tmp_path / "empty"])
    del record["label_free"]
    (other / "metrics.json").write_text(json.dumps(record))
    with pytest.raises(UeoError, match="no label-free scores"):
        compare_runs([other])


def test_the_adapt_report_prints_the_scores_and_one_verdict(two_runs):
    _, runs = two_runs
    record = json.loads((runs["ueo"] / "metrics.json").read_text())
    text = metrics_table(record)
    lines = text.splitlines()
    assert any(line.startswith("label-free, unlabeled") for line in lines)
    assert sum(line.startswith("label-free verdict:") for line in lines) == 1
    assert lines[-1] == verdict(record["label_free"]["zeroshot"], record["label_free"]["adapted"])


@pytest.mark.parametrize(
    ("adapted", "words", "share"),
    [
        (1.10, "adaptation probably helped: the nuclear norm rose 10.0% from zero-shot", "100%"),
        (1.015, "adaptation probably helped: the nuclear norm rose 1.5% from zero-shot", "94%"),
        (0.992, "adaptation probably hurt: the nuclear norm fell 0.8% from zero-shot", "84%"),
        (1.002, "no clear change: the nuclear norm moved +0.2% from zero-shot", "72%"),
    ],
)
def test_verdict_wording_follows_the_measured_table(adapted, words, share):
    line = verdict({RANK_BY: 1.0}, {RANK_BY: adapted})
    assert line.startswith(f"label-free verdict: {words}; on the demo testbed")
    assert f"in {share} of " in line
    assert verdict({RANK_BY: None}, {RANK_BY: 1.0}).startswith("label-free verdict: none")


def test_sureness_is_the_table_of_docs_diagnostics():
    text = (DOCS / "diagnostics.md").read_text()
    section = text[text.index("### Pairs of checkpoints") :]
    row = next(line for line in section.splitlines() if line.startswith("| nuclear norm |"))
    cells = re.findall(r"([0-9.]+) \((\d+)\)", row)
    assert [(float(s), int(n)) for s, n in cells] == [(s, n) for _, s, n in SURENESS]
    header = next(line for line in section.splitlines() if line.startswith("| score |"))
    bins = re.findall(r"\| ([0-9.]+)-([0-9.]+)%", header)
    assert [float(hi) for _, hi in bins] == [limit for limit, _, _ in SURENESS[:-1]]
