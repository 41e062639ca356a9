"""`ueo stream` end to end: zero-shot rows equal `ueo predict`'s, the first batch of every
method is zero-shot's, resets, a kill -9 and a SIGTERM resumed into the uninterrupted CSV and
adapter, the run folder's rules, bad input, the online metrics."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, add_bad_images, make_folder
from PIL import Image
from safetensors import safe_open

from ueo.api import load_model
from ueo.cli import main
from ueo.data import load_image_set
from ueo.layout import ADAPTER_FILE, CHECKPOINT_FILE, METRICS_FILE
from ueo.metrics import compute_metrics
from ueo.objectives import mcm_score
from ueo.recipe import Recipe, Runtime
from ueo.stream.online import OnlineStream
from ueo.stream.run import PREDICTIONS_FILE
from ueo.stream.settings import StreamSettings, stream_methods

pytestmark = pytest.mark.usefixtures("single_thread")

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["--model", "ueo-tiny-rn", "--pretrained", "bundled"]
QUIET = ["--device", "cpu", "--quiet"]
FAST_LR = ["--lr-prompt", "0.02", "--lr-norm", "0.02"]
RUNTIME = Runtime(device="cpu", progress=False)


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> dict:
    """30 generated images (6 per class, 4 known classes and 1 unknown), the class file and
    their list in an order that mixes the classes."""
    root = tmp_path_factory.mktemp("stream")
    make_folder(root / "images")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    images = load_image_set(root / "images", CLASSES)
    order = np.random.default_rng(0).permutation(len(images))
    lines = [
        f"{images.paths[i]} {max(images.labels[i], 0) if images.labels[i] >= 0 else 9}"
        for i in order
    ]
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return {
        "root": root,
        "classes": str(root / "classes.txt"),
        "list": str(root / "list.txt"),
        "images": root / "images",
        "lines": lines,
    }


def stream_argv(place, out, *extra, data=None) -> list[str]:
    data = place["list"] if data is None else data
    return [
        "stream",
        *TINY,
        "--classes",
        place["classes"],
        "--data",
        str(data),
        "--out",
        str(out),
        *QUIET,
        *extra,
    ]


def csv_rows(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def tensors_of(path) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(path) / ADAPTER_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def metrics_of(run) -> dict:
    return json.loads((Path(run) / METRICS_FILE).read_text())


# --- what is predicted -----------------------------------------------------------------------


def test_zeroshot_rows_equal_ueo_predict_of_the_zero_shot_model(place, tmp_path):
    zs = tmp_path / "zeroshot"
    assert (
        main(
            [
                "adapt",
                *TINY,
                "--classes",
                place["classes"],
                "--data",
                place["list"],
                "--epochs",
                "0",
                "--out",
                str(zs),
                "--workers",
                "0",
                *QUIET,
            ]
        )
        == 0
    )
    threshold = str(metrics_of(zs)["threshold"])  # Otsu's of the 30 scores: some on each side
    assert (
        main(
            [
                "predict",
                "--adapter",
                str(zs),
                "--data",
                place["list"],
                "--threshold",
                threshold,
                "--out",
                str(tmp_path / "p.csv"),
                "--workers",
                "0",
                "--eval-batch-size",
                "7",
                *QUIET,
            ]
        )
        == 0
    )
    run = tmp_path / "stream"
    assert (
        main(
            stream_argv(
                place, run, "--method", "zeroshot", "--batch-size", "7", "--threshold", threshold
            )
        )
        == 0
    )
    predicted, streamed = csv_rows(tmp_path / "p.csv"), csv_rows(run / PREDICTIONS_FILE)
    assert streamed[0] == [*predicted[0], "batch"]
    assert [r[:5] for r in streamed[1:]] == predicted[1:]  # every value, as text
    assert [int(r[5]) for r in streamed[1:]] == [1 + i // 7 for i in range(30)]
    assert {r[4] for r in streamed[1:]} == {"True", "False"}
    assert torch.equal(*[tensors_of(r)["prompt.ctx"] for r in (zs, run)])


def images_of(place) -> tuple[list[Image.Image], np.ndarray]:
    images = load_image_set(place["list"], CLASSES)
    return [Image.open(p) for p in images.paths], images.labels


def streamed(method: str, images, labels, batch: int = 8, **settings) -> list:
    """The rows of every batch of a stream through the Python API (a fresh bundled model)."""
    recipe = Recipe(lr_prompt=0.05, lr_norm=0.05)
    model = load_model("ueo-tiny-rn", "bundled", CLASSES, recipe)
    config = StreamSettings(method=method, batch_size=batch, recipe=recipe, **settings)
    with OnlineStream(model, config, RUNTIME) as stream:
        return [
            stream.step(images[i : i + batch], labels=labels[i : i + batch])
            for i in range(0, len(images), batch)
        ]


def same_rows(a, b) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("pred", "prob", "mcm")) and (
        np.array_equal(a.is_unknown, b.is_unknown)
    )


def test_the_first_batch_of_every_method_is_zero_shot(place):
    images, labels = images_of(place)
    zeroshot = streamed("zeroshot", images, labels)
    for method in stream_methods():
        rows = streamed(method, images, labels)
        assert same_rows(rows[0], zeroshot[0]), method  # nothing updated yet
        if method != "zeroshot":
            assert not np.array_equal(rows[-1].mcm, zeroshot[-1].mcm), method  # it adapted


@pytest.mark.parametrize("lr_norm", [0.05, 0.0])
def test_ueo_weights_are_the_zero_shot_mcm_of_each_batch(place, monkeypatch, lr_norm):
    """UEO's weights of every batch are its zero-shot MCM scores: from the second image-tower
    pass with the zero-shot norm affines (norms tuned), or from the kept zero-shot text
    features (norms frozen), though the model has moved."""
    import ueo.stream.online as online

    seen = []
    ueo = online.get_method("ueo")

    def recording(cos, labels, recipe):
        seen.append(mcm_score(cos).numpy())
        return ueo.fixed(cos, labels, recipe)

    images, labels = images_of(place)
    zeroshot = streamed("zeroshot", images, labels)
    monkeypatch.setattr(
        online, "get_method", lambda name: dataclasses.replace(ueo, fixed=recording)
    )
    recipe = Recipe(lr_prompt=0.05, lr_norm=lr_norm)
    model = load_model("ueo-tiny-rn", "bundled", CLASSES, recipe)
    with OnlineStream(model, StreamSettings("ueo", 8, recipe=recipe), RUNTIME) as stream:
        rows = [stream.step(images[i : i + 8]) for i in range(0, len(images), 8)]
    assert len(seen) == 4 and not np.array_equal(rows[-1].mcm, zeroshot[-1].mcm)
    for weights, zero in zip(seen, zeroshot, strict=True):
        assert weights == pytest.approx(zero.mcm, abs=1e-7)


def test_episodic_reset_starts_every_batch_from_the_zero_shot_weights(place):
    images, labels = images_of(place)
    model = load_model("ueo-tiny-rn", "bundled", CLASSES, Recipe(lr_prompt=0.05, lr_norm=0.05))
    zero = {k: v.clone() for k, v in model.adapter_state().items()}

    def starts(reset: str) -> list[bool]:
        """Whether each batch started from the zero-shot weights."""
        config = StreamSettings("ueo", 8, reset, recipe=Recipe(lr_prompt=0.05, lr_norm=0.05))
        found = []
        with OnlineStream(model, config, RUNTIME) as stream:
            for i in range(0, len(images), 8):
                now = model.adapter_state()
                found.append(all(torch.equal(now[k], zero[k]) for k in zero))
                stream.step(images[i : i + 8])
        model.load_adapter_state(zero)
        return found

    assert starts("batch") == [True] * 4
    assert starts("none") == [True, False, False, False]
    episodic = streamed("ueo", images, labels, reset="batch")
    zeroshot = streamed("zeroshot", images, labels)
    assert all(same_rows(a, b) for a, b in zip(episodic, zeroshot, strict=True))


def test_a_domain_column_resets_at_each_change_and_segments_the_metrics(place, tmp_path):
    lines = place["lines"]
    listed = tmp_path / "domains.txt"
    listed.write_text("".join(f"{line} {'A' if i < 12 else 'B'}\n" for i, line in enumerate(lines)))
    runs = {}
    for method in ("zeroshot", "entmin"):
        runs[method] = tmp_path / method
        argv = stream_argv(
            place,
            runs[method],
            "--method",
            method,
            "--batch-size",
            "5",
            "--reset",
            "domain",
            *FAST_LR,
            data=listed,
        )
        assert main(argv) == 0
    rows = {m: csv_rows(r / PREDICTIONS_FILE)[1:] for m, r in runs.items()}
    # a batch never spans two domains: A is 5 + 5 + 2 images, B 5 x 3 + 3
    assert [int(r[5]) for r in rows["entmin"]] == [1] * 5 + [2] * 5 + [3] * 2 + [
        b for b in (4, 5, 6, 7) for _ in range(5 if b < 7 else 3)
    ]
    # each domain's first batch is the zero-shot model's; later ones are adapted
    for first in (slice(0, 5), slice(12, 17)):
        assert rows["entmin"][first] == rows["zeroshot"][first]
    assert rows["entmin"][17:22] != rows["zeroshot"][17:22]
    online = metrics_of(runs["entmin"])["online"]
    labels = load_image_set(place["list"], CLASSES).labels  # 9 is an unknown class
    pred = np.array([CLASSES.index(r[1]) for r in rows["entmin"]])
    mcm = np.array([float(r[3]) for r in rows["entmin"]])
    assert online["all"] == pytest.approx(compute_metrics(pred, mcm, labels))
    assert [(s["domain"], s["first_row"], s["rows"]) for s in online["segments"]] == [
        ("A", 0, 12),
        ("B", 12, 18),
    ]
    assert online["segments"][1]["metrics"] == pytest.approx(
        compute_metrics(pred[12:], mcm[12:], labels[12:])
    )


def test_the_adapter_is_the_final_state_and_serves_predict_and_eval(place, tmp_path):
    run = tmp_path / "run"
    assert main(stream_argv(place, run, "--batch-size", "10", *FAST_LR)) == 0
    record = metrics_of(run)
    assert record["images"] == 30 and record["batches"] == 3 and record["skipped_images"] == 0
    assert record["images_per_s"] > 0 and 0 < record["latency_s"]["median"]
    assert record["latency_s"]["median"] <= record["latency_s"]["p95"]
    zero = load_model("ueo-tiny-rn", "bundled", CLASSES).adapter_state()
    assert not torch.equal(tensors_of(run)["prompt.ctx"], zero["prompt.ctx"])
    assert (
        main(
            [
                "predict",
                "--adapter",
                str(run),
                "--data",
                place["list"],
                "--out",
                str(tmp_path / "p.csv"),
                "--workers",
                "0",
                *QUIET,
            ]
        )
        == 0
    )
    assert len(csv_rows(tmp_path / "p.csv")) == 31
    assert (
        main(["eval", "--adapter", str(run), "--data", place["list"], "--workers", "0", *QUIET])
        == 0
    )
    assert not (run / CHECKPOINT_FILE).exists()


# --- interrupted and resumed -----------------------------------------------------------------


class Streaming:
    """`python -m ueo.cli stream` in a child process, its standard input fed by the test."""

    def __init__(self, argv):
        env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ueo.cli", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )

    def feed(self, lines: list[str]) -> None:
        self.proc.stdin.write("".join(f"{line}\n" for line in lines).encode())
        self.proc.stdin.flush()

    def wait_for(self, condition, limit: float = 120.0) -> None:
        end = time.monotonic() + limit
        while not condition():
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            assert time.monotonic() < end
            time.sleep(0.02)


def rows_in(run) -> int:
    path = Path(run) / PREDICTIONS_FILE
    return len(csv_rows(path)) - 1 if path.is_file() else 0


@pytest.fixture(scope="module")
def reference(place, tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted stream of the list on standard input, the reference of resumes."""
    out = tmp_path_factory.mktemp("reference") / "run"
    argv = stream_argv(
        place, out, "--batch-size", "2", "--checkpoint-every", "2", *FAST_LR, data="-"
    )
    stdin, threads = sys.stdin, torch.get_num_threads()
    sys.stdin = io.StringIO("\n".join(place["lines"]) + "\n")
    torch.set_num_threads(1)  # as the child processes of the tests (OMP_NUM_THREADS=1)
    try:
        assert main(argv) == 0
    finally:
        sys.stdin = stdin
        torch.set_num_threads(threads)
    return out, argv


def resume_in_process(argv: list[str], lines: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    return main([*argv, "--resume"])


def assert_same_stream(run: Path, reference: Path) -> None:
    assert (run / PREDICTIONS_FILE).read_bytes() == (reference / PREDICTIONS_FILE).read_bytes()
    a, b = tensors_of(run), tensors_of(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = metrics_of(run), metrics_of(reference)
    for key in ("online", "threshold", "images", "batches", "unknown"):
        assert ma[key] == mb[key], key
    assert ma["sessions"] == 2


def test_kill_9_mid_stream_then_resume_gives_the_uninterrupted_csv_and_adapter(
    place, reference, tmp_path, monkeypatch
):
    ref, argv = reference
    out = tmp_path / "run"
    argv = [a if a != str(ref) else str(out) for a in argv]
    child = Streaming(argv)
    child.feed(place["lines"][:10])  # 5 batches of 2; a checkpoint after batches 2 and 4
    child.wait_for(lambda: rows_in(out) == 10)  # answered while standard input is still open
    child.proc.send_signal(signal.SIGKILL)
    assert child.proc.wait(60) == -signal.SIGKILL
    assert (out / CHECKPOINT_FILE).is_file() and not (out / ADAPTER_FILE).exists()

    assert resume_in_process(argv, place["lines"], monkeypatch) == 0  # batch 5 recomputed
    assert_same_stream(out, ref)
    assert "resuming from" in (out / "log.txt").read_text()


class Pausing(io.StringIO):
    """Standard input that holds `lines` and then, once `ready()` (the rows of what could
    be answered are written), sends this process SIGTERM and waits, as a pipe with nothing
    more to read does, until `release` is set (then it ends)."""

    def __init__(self, lines: list[str], ready):
        super().__init__("".join(f"{line}\n" for line in lines))
        self.ready, self.release = ready, threading.Event()

    def readline(self, *args) -> str:
        line = super().readline(*args)
        if not line:
            end = time.monotonic() + 60
            while not self.ready() and time.monotonic() < end:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)
            self.release.wait(60)
        return line


def interrupted_in_process(argv, lines, out, rows, monkeypatch, capsys) -> str:
    """Run `argv` on `lines` of standard input, stopped by SIGTERM once `rows` rows are in
    `out`, while it waits for more images; its standard error."""
    stdin = Pausing(lines, lambda: rows_in(out) == rows)
    monkeypatch.setattr(sys, "stdin", stdin)
    try:
        assert main(argv) == 130
    finally:
        stdin.release.set()
    return capsys.readouterr().err


def test_sigterm_while_waiting_for_images_checkpoints_then_resumes(
    place, reference, tmp_path, monkeypatch, capsys
):
    ref, argv = reference
    out = tmp_path / "run"
    argv = [a if a != str(ref) else str(out) for a in argv]
    err = interrupted_in_process(argv, place["lines"][:7], out, 6, monkeypatch, capsys)
    assert "interrupted by SIGTERM; checkpoint after 6 images (batch 3)" in err
    assert rows_in(out) == 6 and "interrupted" in (out / "log.txt").read_text()
    assert resume_in_process(argv, place["lines"], monkeypatch) == 0
    assert_same_stream(out, ref)


def test_resume_refuses_other_settings_and_other_images(place, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = stream_argv(place, out, "--batch-size", "2", data="-")
    interrupted_in_process(argv, place["lines"][:4], out, 4, monkeypatch, capsys)
    assert main([*argv, "--resume", "--batch-size", "3", "--reset", "batch"]) == 2
    assert "other settings: --reset (none -> batch); --batch-size (2 -> 3)." in (
        capsys.readouterr().err
    )
    assert resume_in_process(argv, place["lines"][1:], monkeypatch) == 2
    assert "The first 4 images of --data are not those" in capsys.readouterr().err
    assert main(argv) == 2  # an interrupted stream: --resume or --overwrite
    assert "holds an interrupted stream" in capsys.readouterr().err


# --- the run folder and bad input ------------------------------------------------------------


def test_run_folder_rules(place, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(stream_argv(place, run, "--method", "zeroshot")) == 0
    assert main(stream_argv(place, run, "--method", "zeroshot")) == 2
    assert "holds a finished stream: add --overwrite" in capsys.readouterr().err
    assert main(stream_argv(place, run, "--method", "zeroshot", "--overwrite")) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(stream_argv(place, other)) == 2
    assert "holds other files" in capsys.readouterr().err


def test_unreadable_images_are_counted_and_the_stream_goes_on(tmp_path, capsys):
    folder = tmp_path / "images"
    make_folder(folder, per_class=2)
    add_bad_images(folder)
    classes = ",".join(CLASSES)
    argv = ["stream", *TINY, "--classes", classes, "--data", str(folder), *QUIET]
    assert main([*argv, "--out", str(tmp_path / "run"), "--batch-size", "3"]) == 0
    record = metrics_of(tmp_path / "run")
    assert (record["images"], record["skipped_images"]) == (10, 2)
    assert "2 unreadable image(s) skipped" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "strict"), "--on-bad-image", "error"]) == 2
    assert "ueo: error: Unreadable image:" in capsys.readouterr().err


@pytest.mark.parametrize(("images", "batch"), [(0, 2), (1, 100), (2, 100), (5, 2)])
def test_short_and_empty_streams(place, tmp_path, monkeypatch, capsys, images, batch):
    """An empty stream (here a comment and a blank line) is one error line; a batch larger
    than the stream, or a standard input that closes in the middle of a batch, ends cleanly
    with the short batch."""
    text = "# a comment\n\n" + "".join(f"{line}\n" for line in place["lines"][:images])
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code = main(stream_argv(place, tmp_path / "run", "--batch-size", str(batch), data="-"))
    err = capsys.readouterr().err.strip().splitlines()
    if not images:
        assert code == 2 and err == ["ueo: error: The stream held no image: nothing was predicted."]
    else:
        assert code == 0, err
        record = metrics_of(tmp_path / "run")
        assert (record["images"], record["batches"]) == (images, -(-images // batch))
