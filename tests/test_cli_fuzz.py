"""A fuzz of the command line: many generated option combinations, each with a known outcome.

A seeded generator draws, for `ueo adapt`, `eval`, `predict`, `bench` and `demo`, a value
for each option from values that are fine, values the parser rejects (`usage`), values ueo
must refuse before loading anything (`bad`) and inputs that fail when the data is read
(`data`). The loaders of models are stubs that raise `Loaded`, and the data loaders are
wrapped to record their calls, so the test checks the outcome and the order: argparse's exit
2 for usage errors; one `ueo: error:` line, exit 2 and nothing loaded for bad options; no
model loaded for bad data; and a valid combination must reach the model (or, for
`bench --dry-run`, exit 0). Anything else, a traceback above all, fails the test.
A few valid combinations are then run for real with a bundled tiny model.
"""

from __future__ import annotations

import contextlib
import io
import random

import pytest
import torch
from conftest import CLASSES, UNKNOWN, make_folder

import ueo.bench.jobs
import ueo.bench.sweep
import ueo.demo.runner
import ueo.jobs
from ueo.cli import main
from ueo.jobs import adapt_job
from ueo.recipe import Recipe, Runtime

pytestmark = pytest.mark.usefixtures("single_thread")

RANK = {"ok": 0, "data": 1, "bad": 2, "usage": 3}
VALID = 0.85  # how often an option takes one of its valid values: a mix of all outcomes
CUDA = torch.cuda.is_available()
MPS = torch.backends.mps.is_available()


class Loaded(Exception):
    """A stub model loader was reached: every check before it passed."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    data = tmp / "images"
    make_folder(data, per_class=1)
    (tmp / "empty").mkdir()
    (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp / "all.txt").write_text("\n".join(CLASSES + UNKNOWN) + "\n")
    (tmp / "dup.txt").write_text("red square\nRed_Square\n")
    (tmp / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp / "afile").write_text("x")
    (data / "list.txt").write_text("red_square/000.png 0\nblack_noise/000.png 4\n")
    (data / "plain.txt").write_text("red_square/000.png\nblack_noise/000.png\n")
    (tmp / "badlist.txt").write_text("red_square/000.png x\n")
    (tmp / "missing.txt").write_text("nowhere.png 0\n")
    (tmp / "pickle.bin").write_bytes(b"\x80\x04\x95" + bytes(range(256)))
    (tmp / "exists").mkdir()
    adapt_job(
        tmp / "run",
        model="ueo-tiny-rn",
        pretrained="bundled",
        data=str(data),
        classes=str(tmp / "classes.txt"),
        recipe=Recipe(epochs=0),
        runtime=Runtime(device="cpu", workers=0, progress=False),
    )
    return tmp


def device_values():
    return [
        ("cpu", "ok"),
        ("auto", "ok"),
        ("cpu:0", "ok"),
        ("gpu", "bad"),
        ("", "bad"),
        ("meta", "bad"),
        ("cuda:-1", "bad"),
        ("CPU", "bad"),
        ("cuda", "ok" if CUDA else "bad"),
        ("cuda:7", "ok" if torch.cuda.device_count() > 7 else "bad"),
        ("mps", "ok" if MPS else "bad"),
    ]


def runtime_options(training: bool) -> dict[str, list[tuple[str, str]]]:
    options = {
        "--device": device_values(),
        "--workers": [("0", "ok"), ("2", "ok"), ("-1", "bad"), ("x", "usage"), ("1.5", "usage")],
        "--eval-batch-size": [("1", "ok"), ("300", "ok"), ("0", "bad"), ("-2", "bad")]
        + [("nan", "usage")],
        "--on-bad-image": [("skip", "ok"), ("error", "ok"), ("ignore", "usage")],
        "--quiet": [(None, "ok")],
    }
    if training:
        options["--eval-every"] = [("0", "ok"), ("3", "ok"), ("-1", "bad"), ("x", "usage")]
        options["--compile"] = [(None, "ok")]
    return options


def recipe_options(with_grid: bool) -> dict[str, list[tuple[str, str]]]:
    options = {
        "--epochs": [("0", "ok"), ("2", "ok"), ("-1", "bad"), ("two", "usage")],
        "--batch-size": [("1", "ok"), ("8", "ok"), ("0", "bad"), ("-4", "bad")],
        "--lr-prompt": [("0", "ok"), ("1e-3", "ok"), ("nan", "bad"), ("inf", "bad")]
        + [("-1", "bad"), ("-inf", "bad"), ("x", "usage")],
        "--lr-norm": [("0", "ok"), ("0.01", "ok"), ("NaN", "bad"), ("-1e-9", "bad")],
        "--trade": [("0", "ok"), ("2.5", "ok"), ("nan", "bad"), ("-1", "bad")],
        "--augment": [("default", "ok"), ("none", "ok"), ("some", "usage")],
        "--precision": [("fp32", "ok"), ("bf16", "ok"), ("fp16", "ok" if CUDA else "bad")]
        + [("fp8", "usage")],
        "--norm-layers": [("reference", "ok"), ("all", "ok"), ("none", "usage")],
        "--n-ctx": [("4", "ok"), ("0", "bad"), ("-3", "bad"), ("four", "usage")],
        "--ctx-init": [("a photo of a", "ok"), ("x y", "ok"), ("", "ok")],
    }
    if not with_grid:
        options["--method"] = [("ueo", "ok"), ("entmin", "ok"), ("zeroshot", "ok")]
        options["--method"] += [("nope", "usage")]
        options["--seed"] = [("0", "ok"), ("123", "ok"), ("-1", "bad"), (str(2**64), "bad")]
        options["--seed"] += [("1.5", "usage")]
    return options


def dir_outs(f):
    return [
        (f / "new" / "run", "ok"),
        (f / "exists", "ok"),
        (f / "afile", "bad"),
        (f / "afile" / "sub", "bad"),
        ("/proc/ueo-nowhere", "bad"),
    ]


def data_values(f, labelled: bool = False):
    """Values of --data; `labelled`: for an evaluation, where unlabeled images are refused."""
    unlabeled = "data" if labelled else "ok"
    return [
        (f / "images", "ok"),
        (f / "images" / "red_square" / "000.png", unlabeled),
        (f / "images" / "list.txt", "ok"),
        (f / "images" / "plain.txt", unlabeled),
        (f / "nowhere", "data"),
        (f / "empty", "data"),
        (f / "badlist.txt", "data"),
        (f / "missing.txt", "data"),
        (f / "pickle.bin", "data"),
    ]


def class_values(f):
    return [
        (f / "classes.txt", "ok"),
        ("red square,green_circle", "ok"),
        ("nofile.txt", "bad"),
        (f / "images", "bad"),
        ("", "bad"),
        ("a,,b", "bad"),
        ("red square,Red_Square", "bad"),
        (f / "dup.txt", "bad"),
        (f / "latin1.txt", "bad"),
    ]


class Case:
    """An argument list being drawn, with the worst outcome its values call for."""

    def __init__(self, rng: random.Random, command: str):
        self.rng = rng
        self.argv: list[str] = [command]
        self.kind = "ok"

    def mark(self, kind: str) -> None:
        if RANK[kind] > RANK[self.kind]:
            self.kind = kind

    def give(self, flag: str, values, p: float = 1.0) -> str | None:
        """With probability p, add `flag` with a value drawn from `values`; returns it."""
        if self.rng.random() >= p:
            return None
        good = [v for v in values if v[1] == "ok"]
        if good and self.rng.random() < VALID:
            values = good
        value, kind = self.rng.choice(values)
        self.argv.append(flag if value is None else f"{flag}={value}")
        self.mark(kind)
        return kind

    def required(self, flag: str, values, p: float = 0.97) -> str | None:
        kind = self.give(flag, values, p)
        if kind is None:
            self.mark("usage")
        return kind

    def optional(self, options: dict, p: float = 0.25) -> dict[str, str]:
        given = {}
        for flag, values in options.items():
            kind = self.give(flag, values, p)
            if kind is not None:
                given[flag] = kind
        return given


def recipe_case(case: Case, with_grid: bool) -> None:
    given = case.optional(recipe_options(with_grid))
    if "--ctx-init=" in case.argv and given.get("--n-ctx") != "ok":
        case.mark("bad")  # an empty --ctx-init (a random context) needs a valid --n-ctx


def draw_adapt(rng: random.Random, f) -> Case:
    case = Case(rng, "adapt")
    case.required("--model", [("ueo-tiny-rn", "ok"), ("ueo-tiny-vit", "ok"), ("nope", "bad")])
    case.give("--pretrained", [("bundled", "ok"), ("none", "ok"), ("no-tag", "bad")], 0.97)
    if "--pretrained" not in " ".join(case.argv):
        case.mark("bad")  # the default, openai, is no tag of the tiny models
    case.required("--data", data_values(f))
    case.required("--classes", class_values(f))
    case.give("--test-data", data_values(f, labelled=True), 0.2)
    case.give("--unlabeled", [(None, "ok")], 0.2)
    case.required("--out", dir_outs(f))
    recipe_case(case, with_grid=False)
    case.optional(runtime_options(training=True))
    return case


def draw_eval(rng: random.Random, f) -> Case:
    case = Case(rng, "eval")
    mode = rng.choice(["adapter", "adapter", "zeroshot", "both", "neither", "adapter+model"])
    if mode in ("adapter", "both", "adapter+model"):
        case.argv.append(f"--adapter={f / 'run'}")
    if mode in ("zeroshot", "both"):
        case.argv.append("--zeroshot")
        case.give("--model", [("ueo-tiny-rn", "ok"), ("nope", "bad")], 0.95)
        case.give("--classes", class_values(f), 0.95)
        case.give("--pretrained", [("bundled", "ok"), ("no-tag", "bad")], 0.95)
        if not all(f"{flag}=" in " ".join(case.argv) for flag in ("--model", "--classes")):
            case.mark("bad")
        if "--pretrained=" not in " ".join(case.argv):
            case.mark("bad")
    else:
        case.give("--pretrained", [("bundled", "ok"), ("no-tag", "bad")], 0.2)
    if mode in ("both", "neither"):
        case.mark("bad")
    if mode == "adapter+model":
        case.argv.append("--model=ueo-tiny-rn")
        case.mark("bad")
    case.required("--data", data_values(f, labelled=True))
    case.give("--unlabeled", [(None, "bad")], 0.05)
    case.give("--out", dir_outs(f), 0.4)
    case.optional(runtime_options(training=False))
    return case


def draw_predict(rng: random.Random, f) -> Case:
    case = Case(rng, "predict")
    case.required("--adapter", [(f / "run", "ok"), (f / "afile", "bad"), (f / "nope", "bad")])
    case.required("--images", data_values(f))
    case.give("--unlabeled", [(None, "ok")], 0.2)
    case.required(
        "--out",
        [
            (f / "new" / "p.csv", "ok"),
            (f / "afile", "ok"),
            (f / "images", "bad"),
            (f / "afile" / "p.csv", "bad"),
            ("/proc/ueo-nowhere.csv", "bad"),
        ],
    )
    case.give("--threshold", [("0", "ok"), ("0.5", "ok"), ("1", "ok"), ("-0.1", "bad")], 0.3)
    case.give("--threshold", [("1.01", "bad"), ("nan", "bad"), ("inf", "bad"), ("x", "usage")], 0.1)
    case.optional(runtime_options(training=False))
    return case


def draw_bench(rng: random.Random, f) -> Case:
    case = Case(rng, "bench")
    case.give("--data", [(f / "images", "ok"), (f / "nowhere", "data")], 0.97)
    if "--data=" not in " ".join(case.argv):
        case.mark("bad")  # neither --data nor --dataset
    all_classes = [(f / "all.txt", "ok"), ("nofile.txt", "bad"), ("a,a", "bad")]
    case.give("--all-classes", all_classes, 0.97)
    if "--all-classes=" not in " ".join(case.argv):
        case.mark("bad")
    known = rng.choice(["known", "known", "names", "both", "neither"])
    if known in ("known", "both"):
        case.give("--known", [("2", "ok"), ("5", "ok"), ("0", "bad"), ("6", "bad")])
        case.give("--known", [("-1", "bad"), ("x", "usage")], 0.1)
    if known in ("names", "both"):
        case.give("--known-classes", [("red square", "ok"), ("red square,Red_Square", "bad")])
    if known in ("both", "neither"):
        case.mark("bad")
    case.give("--seeds", [("1", "ok"), ("1,2", "ok"), ("1,1", "bad"), ("-1", "bad")], 0.3)
    case.give("--seeds", [("", "bad"), ("x", "bad"), ("1.5", "bad")], 0.1)
    case.give("--methods", [("ueo", "ok"), ("ueo,entmin", "ok"), ("ueo,ueo", "bad")], 0.3)
    case.give("--methods", [("nope", "bad"), ("", "bad")], 0.1)
    case.give("--scenarios", [("CDA", "ok"), ("cda,pda", "ok"), ("CDA,cda", "bad")], 0.3)
    case.give("--scenarios", [("XDA", "bad"), ("", "bad")], 0.1)
    if "--known=5" in case.argv and not any(a.startswith("--scenarios=") for a in case.argv):
        case.mark("data")  # all classes known: no ODA/OPDA, found once the folder is read
    case.give("--domains", [("images", "ok"), ("images,images", "bad"), ("nope", "data")], 0.2)
    case.give("--shard", [("0/1", "ok"), ("1/2", "ok"), ("2/2", "bad"), ("x", "bad")], 0.2)
    case.give("--model", [("ueo-tiny-rn", "ok"), ("RN50", "ok"), ("nope", "bad")], 0.5)
    if "--model=RN50" in case.argv or not any(a.startswith("--model=") for a in case.argv):
        case.give("--pretrained", [("openai", "ok"), ("no-tag", "bad")], 0.5)
    else:
        case.give("--pretrained", [("bundled", "ok"), ("no-tag", "bad")], 0.9)
        if "--pretrained=" not in " ".join(case.argv):
            case.mark("bad")  # the default, openai, is no tag of the tiny models
    case.required("--out", dir_outs(f))
    case.give("--dry-run", [(None, "ok")], 0.5)
    recipe_case(case, with_grid=True)
    case.optional(runtime_options(training=True))
    return case


def draw_demo(rng: random.Random, f) -> Case:
    case = Case(rng, "demo")
    case.give("--out", dir_outs(f), 0.9)
    case.give("--device", device_values(), 0.5)
    case.give("--model", [("ueo-tiny-vit", "ok"), ("RN50", "usage")], 0.3)
    case.give("--quick", [(None, "ok")], 0.5)
    case.give("--quiet", [(None, "ok")], 0.5)
    return case


DRAW = {
    "adapt": draw_adapt,
    "eval": draw_eval,
    "predict": draw_predict,
    "bench": draw_bench,
    "demo": draw_demo,
}


def junk(case: Case) -> None:
    """Now and then an unknown option or a stray word: argparse's usage error."""
    if case.rng.random() < 0.04:
        case.argv.insert(case.rng.randrange(1, len(case.argv) + 1), "--bogus")
        case.mark("usage")


@pytest.fixture
def recorded(monkeypatch):
    """Model loaders become stubs that raise Loaded; data loaders are recorded and run."""
    calls = {"data": [], "model": []}

    def stub(name):
        def load(*args, **kwargs):
            calls["model"].append(name)
            raise Loaded(name)

        return load

    def recording(name, real):
        def load(*args, **kwargs):
            calls["data"].append(name)
            return real(*args, **kwargs)

        return load

    for module, name in [
        (ueo.jobs, "load_model"),
        (ueo.jobs, "load_adapted"),
        (ueo.bench.sweep, "load_clip"),
        (ueo.demo.runner, "build_testbed"),
    ]:
        monkeypatch.setattr(module, name, stub(name))
    for module, name in [(ueo.jobs, "load_image_set"), (ueo.bench.jobs, "folder_suite")]:
        monkeypatch.setattr(module, name, recording(name, getattr(module, name)))
    return calls


def outcome(argv: list[str]) -> tuple[str, int | None, str]:
    """('exit', code, stderr), ('loaded', None, stderr) or ('usage', 2, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            return "usage", exc.code, err.getvalue()
        except Loaded:
            return "loaded", None, err.getvalue()
    return "exit", code, err.getvalue()


@pytest.mark.parametrize("command", list(DRAW))
def test_fuzz_command_line(files, recorded, command):
    rng = random.Random(f"ueo-fuzz-{command}")
    kinds = {k: 0 for k in RANK}
    for _ in range(200):
        case = DRAW[command](rng, files)
        junk(case)
        argv = [str(a) for a in case.argv]
        recorded["data"].clear()
        recorded["model"].clear()
        how, code, err = outcome(argv)  # any other exception fails the test with its traceback
        kinds[case.kind] += 1
        where = f"{argv}\n{err}"
        assert "Traceback" not in err, where
        if case.kind == "usage":
            assert (how, code) == ("usage", 2), where
            continue
        if case.kind in ("bad", "data"):
            lines = err.strip().splitlines()
            assert (how, code) == ("exit", 2), where
            assert lines[-1].startswith("ueo: error: "), where
            assert sum("ueo: error:" in line for line in lines) == 1, where
            assert recorded["model"] == [], where
            if case.kind == "bad":
                assert len(lines) == 1 and recorded["data"] == [], where
            continue
        if command == "bench" and "--dry-run" in argv:
            assert (how, code) == ("exit", 0), where
        elif command == "bench" and "--shard=1/2" in argv and how == "exit":
            assert code == 0, where  # a shard may hold no cell of a small grid
        else:
            assert how == "loaded", where
    assert min(kinds.values()) > 0 or command == "demo", kinds  # every outcome was drawn


@pytest.mark.parametrize("seed", [0, 1])
def test_valid_draws_run_for_real(files, seed, tmp_path):
    """Valid combinations of adapt, then eval and predict on its adapter, end to end."""
    rng = random.Random(f"ueo-real-{seed}")
    case = draw_adapt(rng, files)
    while case.kind != "ok" or any(
        a.startswith(("--device=cuda", "--device=mps")) for a in case.argv
    ):
        case = draw_adapt(rng, files)
    argv = [
        a for a in map(str, case.argv) if not a.startswith(("--out=", "--workers=", "--epochs="))
    ]
    argv += [f"--out={tmp_path / 'run'}", "--workers=0", "--epochs=1", "--quiet"]
    how, code, err = outcome(argv)
    assert (how, code) == ("exit", 0), f"{argv}\n{err}"
    how, code, err = outcome(
        ["predict", f"--adapter={tmp_path / 'run'}", f"--images={files / 'images'}"]
        + [f"--out={tmp_path / 'p.csv'}", "--workers=0", "--quiet"]
    )
    assert (how, code) == ("exit", 0), err
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + len(CLASSES + UNKNOWN)
    how, code, err = outcome(
        ["eval", f"--adapter={tmp_path / 'run'}", f"--data={files / 'images'}", "--workers=0"]
        + ["--quiet", f"--out={tmp_path / 'eval'}"]
    )
    assert (how, code) == ("exit", 0), err
    assert (tmp_path / "eval" / "metrics.json").is_file()
