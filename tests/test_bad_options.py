"""Every option is checked before any data or model is loaded: one `ueo: error:` line, exit 2.

The loaders are replaced by stubs that record their calls, so each test proves both the clean
answer and that nothing heavy ran before it.
"""

from __future__ import annotations

import os
import stat

import pytest
import torch
from conftest import CLASSES, UNKNOWN, untrained_run

import ueo.bench.jobs
import ueo.bench.sweep
import ueo.demo.runner
import ueo.jobs
from ueo.bench.plan import Sweep
from ueo.checks import check_output_dir, check_output_file
from ueo.cli import main
from ueo.errors import UeoError
from ueo.jobs import adapt_job, eval_job, predict_job
from ueo.recipe import Runtime

pytestmark = pytest.mark.usefixtures("single_thread")


class Loaded(Exception):
    """Raised by a stub loader: the command got past its checks."""


@pytest.fixture
def loads(monkeypatch):
    """Replace every loader of data, adapters and models by a stub; returns the calls."""
    calls: list[str] = []

    def stub(name):
        def record(*args, **kwargs):
            calls.append(name)
            raise Loaded(name)

        return record

    for module, name in [
        (ueo.jobs, "load_image_set"),
        (ueo.jobs, "load_model"),
        (ueo.jobs, "load_adapted"),
        (ueo.bench.jobs, "folder_suite"),
        (ueo.bench.jobs, "prepare_lists"),
        (ueo.bench.jobs, "benchmark_suite"),
        (ueo.bench.sweep, "load_clip"),
        (ueo.demo.runner, "build_testbed"),
    ]:
        monkeypatch.setattr(module, name, stub(f"{module.__name__}.{name}"))
    return calls


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A labelled folder, a class file, a file and a real tiny adapter made without training."""
    tmp_path = tmp_path_factory.mktemp("bad-options")
    run = untrained_run(tmp_path)
    every = tmp_path / "all.txt"
    every.write_text("\n".join(CLASSES + UNKNOWN) + "\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    return {
        **run,
        "all": str(every),
        "afile": str(afile),
        "adapter": str(run["adapter"]),
        "tmp": tmp_path,
    }


def run_cli(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def adapt_args(s, out=None):
    out = out or s["tmp"] / "out"
    return [
        "adapt", "--model", "ueo-tiny-rn", "--pretrained", "bundled", "--data", s["data"],
        "--classes", s["classes"], "--out", out, "--workers", "0", "--quiet",
    ]  # fmt: skip


def eval_args(s):
    return ["eval", "--adapter", s["adapter"], "--data", s["data"], "--workers", "0", "--quiet"]


def predict_args(s, out=None):
    out = out or s["tmp"] / "p.csv"
    return ["predict", "--adapter", s["adapter"], "--images", s["data"], "--out", out, "--quiet"]


def bench_args(s, *extra):
    return [
        "bench", "--data", s["data"], "--all-classes", s["all"], "--known", "2", "--model",
        "ueo-tiny-rn", "--pretrained", "bundled", "--out", s["tmp"] / "bench", *extra,
    ]  # fmt: skip


def refused(argv, capsys, loads, *words) -> str:
    """The command ends with one `ueo: error:` line naming `words`, before loading anything."""
    code, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ueo: error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    assert loads == [], f"loaded {loads} before refusing"
    return lines[0]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without CUDA")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks it without MPS")


# --- numbers, in range and finite ----------------------------------------------------------

RECIPE_CASES = [
    (["--epochs", "-1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--lr-prompt", "nan"], "--lr-prompt"),
    (["--lr-prompt", "inf"], "--lr-prompt"),
    (["--lr-prompt", "-1"], "--lr-prompt"),
    (["--lr-norm=-inf"], "--lr-norm"),
    (["--trade", "nan"], "--trade"),
    (["--trade", "-0.5"], "--trade"),
    (["--n-ctx", "0"], "--n-ctx"),
    (["--ctx-init", "", "--n-ctx", "-3"], "--n-ctx"),
    (["--ctx-init", ""], "--n-ctx"),
    (["--eval-every", "-1"], "--eval-every"),
]
RUNTIME_CASES = [
    (["--eval-batch-size", "0"], "--eval-batch-size"),
    (["--eval-batch-size", "-5"], "--eval-batch-size"),
    (["--workers", "-1"], "--workers"),
    (["--device", "gpu"], "gpu"),
    (["--device", ""], "--device"),
    (["--device", "cuda:-1"], "cuda:-1"),
    (["--device", "meta"], "meta"),
    pytest.param(["--device", "cuda:7"], "cuda:7", marks=NO_CUDA),
    pytest.param(["--device", "cuda"], "cuda", marks=NO_CUDA),
    pytest.param(["--device", "mps"], "mps", marks=NO_MPS),
]


@pytest.mark.parametrize("extra, word", RECIPE_CASES + RUNTIME_CASES)
def test_adapt_refuses_bad_numbers_and_devices(setup, capsys, loads, extra, word):
    refused(adapt_args(setup) + extra, capsys, loads, word)
    assert not (setup["tmp"] / "out").exists()


@pytest.mark.parametrize("extra, word", RECIPE_CASES + RUNTIME_CASES)
def test_bench_refuses_bad_numbers_and_devices(setup, capsys, loads, extra, word):
    refused(bench_args(setup, *extra), capsys, loads, word)


@pytest.mark.parametrize("extra, word", RUNTIME_CASES)
def test_eval_refuses_bad_numbers_and_devices(setup, capsys, loads, extra, word):
    refused(eval_args(setup) + extra, capsys, loads, word)


@pytest.mark.parametrize("extra, word", RUNTIME_CASES)
def test_predict_refuses_bad_numbers_and_devices(setup, capsys, loads, extra, word):
    refused(predict_args(setup) + extra, capsys, loads, word)


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan", "inf"])
def test_predict_threshold_outside_0_1(setup, capsys, loads, value):
    refused(predict_args(setup) + ["--threshold", value], capsys, loads, "--threshold")


@NO_CUDA
def test_fp16_without_cuda_is_refused_before_loading(setup, capsys, loads):
    refused(adapt_args(setup) + ["--precision", "fp16", "--device", "cpu"], capsys, loads, "fp16")


@pytest.mark.parametrize("device", ["gpu", "mps", "cuda:7"])
def test_demo_device(setup, capsys, loads, device):
    if device != "gpu" and (torch.cuda.is_available() or torch.backends.mps.is_available()):
        pytest.skip("the machine has an accelerator")
    refused(["demo", "--quick", "--device", device, "--out", setup["tmp"] / "d"], capsys, loads)


# --- names: models, weights, methods --------------------------------------------------------


def test_unknown_model_and_tag_are_refused_before_the_data(setup, capsys, loads):
    argv = adapt_args(setup)
    argv[argv.index("ueo-tiny-rn")] = "no-such-model"
    refused(argv, capsys, loads, "no-such-model")
    argv = adapt_args(setup)
    argv[argv.index("bundled")] = "no-such-tag"
    refused(argv, capsys, loads, "no-such-tag")
    refused(eval_args(setup) + ["--pretrained", "no-such-tag"], capsys, loads, "no-such-tag")


def test_eval_with_adapter_refuses_zeroshot_options(setup, capsys, loads):
    refused(eval_args(setup) + ["--model", "RN50"], capsys, loads, "--zeroshot")
    refused(eval_args(setup) + ["--zeroshot"], capsys, loads, "--adapter")


# --- bench: the grid ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--seeds", "1,2,1"], ["--seeds", "1 twice"]),
        (["--methods", "ueo,entmin,ueo"], ["--methods", "ueo twice"]),
        (["--scenarios", "CDA,ODA,cda"], ["--scenarios", "CDA twice"]),
        (["--domains", "a,a"], ["--domains", "a twice"]),
        (["--seeds", ""], ["--seeds", "empty"]),
        (["--methods", ","], ["--methods", "empty"]),
        (["--seeds", "-1"], ["--seeds"]),
        (["--seeds", "1.5"], ["--seeds"]),
        (["--methods", "nope"], ["nope"]),
        (["--scenarios", "XDA"], ["XDA"]),
        (["--shard", "2/2"], ["--shard"]),
        (["--shard", "x"], ["--shard"]),
        (["--shard", "0/0"], ["--shard"]),
        (["--shard", "1/2/3"], ["--shard"]),
        (["--known-classes", "red square"], ["--known", "not both"]),
    ],
)
def test_bench_grid_is_checked_before_anything_heavy(setup, capsys, loads, extra, words):
    refused(bench_args(setup, *extra), capsys, loads, *words)


@pytest.mark.parametrize("known", ["0", "-2", "6"])
def test_bench_known_out_of_range(setup, capsys, loads, known):
    argv = bench_args(setup)
    argv[argv.index("--known") + 1] = known
    refused(argv, capsys, loads, "--known", known)


def test_bench_duplicated_known_classes(setup, capsys, loads):
    argv = [a for a in bench_args(setup) if a not in ("--known", "2")]
    refused(argv + ["--known-classes", "red square,Red_Square"], capsys, loads, "twice")


def test_bench_options_of_the_other_source(setup, capsys, loads):
    argv = ["bench", "--dataset", "office31", "--root", setup["tmp"], "--known", "3"]
    refused(argv + ["--out", setup["tmp"] / "b"], capsys, loads, "--known", "--data")
    refused(bench_args(setup, "--root", setup["tmp"]), capsys, loads, "--root")


def test_bench_grid_check_names_the_duplicate_in_python():
    with pytest.raises(UeoError, match="--seeds lists 3 twice"):
        Sweep("ueo-tiny-rn", "bundled", seeds=[3, 4, 3]).validate()


def test_bench_valid_options_reach_the_data(setup, capsys, loads):
    with pytest.raises(Loaded):
        run_cli(bench_args(setup, "--seeds", "1,2", "--methods", "ueo,entmin"), capsys)
    assert loads == ["ueo.bench.jobs.folder_suite"]


# --- output paths ------------------------------------------------------------------------------


def unwritable_cases(s):
    return {
        "an existing file": (s["afile"], "is a file"),
        "under a file": (os.path.join(s["afile"], "sub"), "is a file"),
        "in /proc": ("/proc/ueo-nowhere", "not writable"),
    }


@pytest.mark.parametrize("case", ["an existing file", "under a file", "in /proc"])
def test_output_directory_of_the_wrong_kind(setup, capsys, loads, case):
    out, words = unwritable_cases(setup)[case]
    refused(adapt_args(setup, out), capsys, loads, out, words)
    refused(eval_args(setup) + ["--out", out], capsys, loads, out, words)
    refused(bench_args(setup)[:-2] + ["--out", out], capsys, loads, out, words)
    refused(["demo", "--quick", "--out", out], capsys, loads, out, words)


@pytest.mark.parametrize("case", ["a directory", "under a file", "in /proc", "a pipe"])
def test_predict_output_file_of_the_wrong_kind(setup, capsys, loads, case, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    out, words = {
        "a directory": (setup["data"], "is a directory"),
        "under a file": (os.path.join(setup["afile"], "p.csv"), "is a file"),
        "in /proc": ("/proc/ueo-nowhere.csv", "not writable"),
        "a pipe": (str(fifo), "not a regular file"),
    }[case]
    refused(predict_args(setup, out), capsys, loads, out, words)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(setup, capsys, loads, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        refused(adapt_args(setup, folder / "run"), capsys, loads, "not writable")
        refused(predict_args(setup, folder / "p.csv"), capsys, loads, "not writable")
    finally:
        folder.chmod(0o755)


def test_output_checks_leave_nothing_behind(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper")
    check_output_file(tmp_path / "x" / "p.csv")
    check_output_dir(tmp_path)
    assert os.listdir(tmp_path) == []


def test_output_name_too_long(tmp_path):
    with pytest.raises(UeoError, match="--out"):
        check_output_dir(tmp_path / ("x" * 5000))
    with pytest.raises(UeoError, match="--out"):
        check_output_file(tmp_path / ("x" * 5000))


def test_adapt_checks_its_output_before_loading_the_model(setup, monkeypatch):
    """Python callers get the same checks as the command line."""
    loaded = []
    monkeypatch.setattr(ueo.jobs, "load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(UeoError, match="is a file"):
        adapt_job(
            setup["afile"],
            model="ueo-tiny-rn",
            pretrained="bundled",
            data=setup["data"],
            classes=setup["classes"],
        )
    with pytest.raises(UeoError, match="--threshold"):
        predict_job(setup["adapter"], setup["data"], setup["tmp"] / "p.csv", threshold=2.0)
    with pytest.raises(UeoError, match="--eval-batch-size"):
        eval_job(setup["data"], adapter=setup["adapter"], runtime=Runtime(eval_batch_size=0))
    assert loaded == []


# --- a single image, end to end ----------------------------------------------------------------


def test_predict_a_single_image(setup, capsys, tmp_path):
    image = os.path.join(setup["data"], "red_square", "000.png")
    out = tmp_path / "one.csv"
    code, err = run_cli(predict_args(setup, out)[:-1] + ["--workers", "0", "--quiet"], capsys)
    assert code == 0, err
    argv = ["predict", "--adapter", setup["adapter"], "--images", image, "--out", out]
    code, err = run_cli(argv + ["--workers", "0", "--quiet"], capsys)
    assert code == 0, err
    rows = out.read_text().splitlines()
    assert rows[0] == "path,pred,prob,mcm,is_unknown"
    assert len(rows) == 2 and rows[1].startswith(image + ",")
    assert rows[1].split(",")[1] in CLASSES
