"""Runs you can trust (docs/reliability.md): fingerprints, checkpoint and resume, non-finite
values, one run per folder, checked adapters, unusable data. Real runs of the bundled tiny
model on generated images; the interruption tests kill a real `ueo adapt` process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, make_folder
from PIL import Image
from safetensors import safe_open

from ueo.bench.plan import Sweep
from ueo.bench.suites import folder_suite
from ueo.bench.sweep import run_sweep
from ueo.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from ueo.cli import build_parser, main
from ueo.errors import UeoError
from ueo.files import write_json
from ueo.fingerprint import weights_identity
from ueo.layout import ADAPTER_FILE
from ueo.recipe import Recipe, Runtime
from ueo.runs import load_adapter, staging_dir

pytestmark = pytest.mark.usefixtures("single_thread")

SRC = Path(__file__).resolve().parents[1] / "src"
BUNDLED = ["--model", "ueo-tiny-rn", "--pretrained", "bundled"]
FAST = ["--workers", "0", "--quiet"]


ALL = ",".join(CLASSES)


def adapt_argv(data, out, *extra, classes=ALL) -> list[str]:
    return ["adapt", *BUNDLED, "--data", str(data), "--classes", classes, "--out", str(out), *extra]


def tensors_of(path) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(path) / ADAPTER_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_adapter(a, b, tol=1e-6) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=tol, rtol=0), k


# --- 2. checkpoint and resume: a real process, killed -------------------------------------


@pytest.fixture
def slow_images(tmp_path):
    """Unlabeled images large enough (decoding ~10 ms each) that an epoch can be caught."""
    return noise_images(tmp_path / "slow", 32, 600, seed=0)


def noise_images(root, n: int, size: int, seed: int):
    """`n` RGB noise PNGs of `size` x `size` in a new folder `root`, named in order."""
    root.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:03d}.png")
    return root


class Cli:
    """`python -m ueo.cli` in a child process, its stderr (progress bars) read as it comes."""

    def __init__(self, argv):
        env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ueo.cli", *argv],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        self.err = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self.err += chunk.decode(errors="replace")

    def wait_for(self, condition, limit=300.0):
        end = time.monotonic() + limit
        while not condition():
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.err[-2000:]}"
            assert time.monotonic() < end, self.err[-2000:]
            time.sleep(0.01)

    def finish(self, limit=300.0) -> int:
        rc = self.proc.wait(limit)
        self.reader.join(10)
        return rc


def batches_done(text: str, epoch: int, epochs: int) -> int:
    """The last batch count tqdm printed for `epoch`."""
    found = re.findall(rf"epoch {epoch}/{epochs}:[^\r\n]*?\| *(\d+)/\d+", text)
    return int(found[-1]) if found else 0


RUN = ["--epochs", "3", "--batch-size", "2", "--workers", "0", "--seed", "5"]


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, slow_images):
    reference = tmp_path / "reference"
    assert main(adapt_argv(slow_images, reference, *RUN, "--augment", "none", "--quiet")) == 0

    out = tmp_path / "killed"
    argv = adapt_argv(slow_images, out, *RUN, "--augment", "none")
    ckpt = staging_dir(out) / CHECKPOINT_FILE
    run = Cli(argv)
    run.wait_for(lambda: ckpt.is_file() and batches_done(run.err, 2, 3) >= 2)
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    meta = load_checkpoint(ckpt)[1]
    assert (meta["epoch"], meta["batch"]) == (2, 0)  # killed inside epoch 2: it is replayed
    assert not out.exists()  # nothing half-made where the run belongs

    resumed = Cli([*argv, "--resume", "--quiet"])
    assert resumed.finish() == 0, resumed.err
    assert_same_adapter(out, reference)
    a = json.loads((out / "metrics.json").read_text())
    b = json.loads((reference / "metrics.json").read_text())
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]])
    assert a["threshold"] == pytest.approx(b["threshold"], abs=1e-6)
    assert not staging_dir(out).exists()
    assert "resuming from" in (out / "log.txt").read_text()


def test_sigterm_checkpoints_mid_epoch_and_resumes_with_augmentation(tmp_path, slow_images):
    """SIGTERM writes a checkpoint after the current batch. The augmentation is drawn from
    (seed, epoch, image), so an augmented run resumes exactly, here with 2 loader workers
    against a reference made without workers."""
    reference = tmp_path / "reference"
    assert main(adapt_argv(slow_images, reference, *RUN, "--quiet")) == 0
    out = tmp_path / "stopped"
    argv = adapt_argv(slow_images, out, *RUN, "--workers", "2")
    run = Cli(argv)
    run.wait_for(lambda: batches_done(run.err, 1, 3) >= 3)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 130, run.err
    assert "interrupted by SIGTERM" in run.err
    meta = load_checkpoint(staging_dir(out) / CHECKPOINT_FILE)[1]
    assert meta["epoch"] == 1 and 0 < meta["batch"] < 16
    assert "interrupted" in (staging_dir(out) / "log.txt").read_text()

    assert main([*argv, "--resume", "--quiet"]) == 0
    assert_same_adapter(out, reference)


# --- 2. resume refuses other settings; 4. one run per folder --------------------------------


@pytest.fixture
def small_folder(tmp_path):
    root = tmp_path / "images"
    make_folder(root, per_class=3)
    return root


ONE = ["--epochs", "1", "--batch-size", "8", *FAST]


def test_resume_with_other_settings_is_refused_naming_them(tmp_path, small_folder):
    out = tmp_path / "run"
    staging = staging_dir(out)
    # What an interrupted `ueo adapt` leaves: the staging folder with a checkpoint in it.
    from ueo.adaptation import adapt
    from ueo.api import load_model
    from ueo.data import load_image_set

    images = load_image_set(small_folder, CLASSES)
    recipe = Recipe(epochs=1, batch_size=8)
    net = load_model("ueo-tiny-rn", "bundled", CLASSES, recipe)
    adapt(net, images, recipe, Runtime(workers=0, progress=False), checkpoint_dir=staging)
    assert (staging / CHECKPOINT_FILE).is_file()

    with pytest.raises(UeoError, match="add --resume to continue it, or --overwrite"):
        main_raising(adapt_argv(small_folder, out, *ONE))
    with pytest.raises(UeoError, match=r"--lr-prompt \(0.0001 -> 0.001\)"):
        main_raising(adapt_argv(small_folder, out, *ONE, "--resume", "--lr-prompt", "1e-3"))
    other = ",".join(reversed(CLASSES))
    with pytest.raises(UeoError, match="the class names"):
        main_raising(adapt_argv(small_folder, out, *ONE, "--resume", classes=other))
    # A checkpoint of ueo before the keyed augmentation draws (its identity does not name them).
    checkpoint = staging / CHECKPOINT_FILE
    original = checkpoint.read_bytes()
    tensors, meta = load_checkpoint(checkpoint)
    assert meta["identity"].pop("augmentation_draws") == "keyed by (seed, epoch, image)"
    save_checkpoint(checkpoint, tensors, {k: v for k, v in meta.items() if k != "format"})
    earlier = r"how augmentation is drawn \(each loader worker's generator \(ueo before"
    with pytest.raises(UeoError, match=earlier):
        main_raising(adapt_argv(small_folder, out, *ONE, "--resume"))
    checkpoint.write_bytes(original)
    assert main(adapt_argv(small_folder, out, *ONE, "--resume")) == 0
    assert (out / ADAPTER_FILE).is_file() and not staging.exists()


def main_raising(argv):
    """The command's job, called so that its UeoError is seen (main() turns it into exit 2)."""
    args = build_parser().parse_args(argv)
    return args.run(args)


def test_finished_run_is_refused_replaced_only_with_overwrite(tmp_path, small_folder):
    out = tmp_path / "run"
    assert main(adapt_argv(small_folder, out, *ONE)) == 0
    first = tensors_of(out)
    with pytest.raises(UeoError, match="holds a finished run: add --overwrite"):
        main_raising(adapt_argv(small_folder, out, *ONE, "--seed", "9"))
    # A failed re-run (it diverges) leaves the finished run as it was, and logs why it failed.
    bad = ["--lr-prompt", "1e6", "--lr-norm", "1e6", "--overwrite"]
    assert main(adapt_argv(small_folder, out, *ONE, *bad)) == 2
    assert all(torch.equal(first[k], v) for k, v in tensors_of(out).items())
    assert "ERROR failed:" in (staging_dir(out) / "log.txt").read_text()
    assert main(adapt_argv(small_folder, out, *ONE, "--seed", "9", "--overwrite")) == 0
    assert json.loads((out / "metrics.json").read_text())["recipe"]["seed"] == 9
    assert not staging_dir(out).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_eval_never_overwrites_a_training_run(tmp_path, small_folder):
    out = tmp_path / "run"
    assert main(adapt_argv(small_folder, out, *ONE)) == 0
    before = (out / "metrics.json").read_bytes()
    argv = ["eval", "--adapter", str(out), "--data", str(small_folder), "--out", str(out), *FAST]
    with pytest.raises(UeoError, match="holds a training run"):
        main_raising(argv)
    assert (out / "metrics.json").read_bytes() == before
    elsewhere = tmp_path / "eval"
    argv[argv.index(str(out), 3)] = str(elsewhere)
    assert main(argv) == 0
    assert "metrics" in json.loads((elsewhere / "metrics.json").read_text())


def test_out_folder_with_foreign_files_is_refused(tmp_path, small_folder):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UeoError, match="holds other files and no ueo run"):
        main_raising(adapt_argv(small_folder, out, *ONE))
    assert (out / "notes.txt").read_text() == "keep me"


# --- 3. non-finite values never reach a file ------------------------------------------------


@pytest.fixture
def unlabeled_images(tmp_path):
    return noise_images(tmp_path / "unlabeled", 12, 40, seed=1)


def test_diverging_run_fails_and_writes_no_result(tmp_path, unlabeled_images, capsys):
    """The issue's reproduction: one huge step makes the outputs NaN; it used to exit 0 with a
    NaN threshold."""
    out = tmp_path / "run"
    big = ["--lr-prompt", "1e6", "--lr-norm", "1e6", "--epochs", "1", "--batch-size", "12"]
    assert main(adapt_argv(unlabeled_images, out, *big, *FAST, classes="cat,dog")) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not out.exists()
    assert not list(staging_dir(out).glob("*.safetensors"))


def test_nonfinite_loss_stops_or_is_skipped(tmp_path, small_folder, capsys):
    big = ["--lr-prompt", "1e6", "--lr-norm", "1e6", "--epochs", "2", "--batch-size", "5"]
    out = tmp_path / "stop"
    assert main(adapt_argv(small_folder, out, *big, *FAST)) == 2
    err = capsys.readouterr().err
    assert re.search(r"is not finite at epoch 1, batch \d+: stopped", err), err
    assert not out.exists()


def nan_gradient_on_step(monkeypatch, step: int) -> None:
    """Make the UEO loss give a finite value but a NaN gradient on its `step`-th call
    (d sqrt(x)/dx at 0 is inf, times the 0 of x = 0 * logits is NaN)."""
    import dataclasses

    import ueo.adaptation
    from ueo.methods import get_method

    method = get_method("ueo")
    calls = []

    def loss(batch):
        calls.append(1)
        value = method.loss(batch)
        if len(calls) == step:
            value = value + torch.sqrt(batch.logits.sum() * 0)
        return value

    monkeypatch.setattr(
        ueo.adaptation, "get_method", lambda name: dataclasses.replace(method, loss=loss)
    )


def adapt_small(folder, recipe, **kwargs):
    from ueo.adaptation import adapt
    from ueo.api import load_model
    from ueo.data import load_image_set

    net = load_model("ueo-tiny-rn", "bundled", CLASSES, recipe)
    images = load_image_set(folder, CLASSES)
    return net, adapt(net, images, recipe, Runtime(workers=0, progress=False), **kwargs)


def test_nonfinite_gradient_stops_the_run(monkeypatch, small_folder):
    nan_gradient_on_step(monkeypatch, 2)
    with pytest.raises(UeoError, match=r"The gradient of \w+\[0\] is not finite at epoch 1, b"):
        adapt_small(small_folder, Recipe(epochs=1, batch_size=5))


def test_skip_undoes_a_step_with_a_nonfinite_gradient(monkeypatch, small_folder):
    nan_gradient_on_step(monkeypatch, 2)
    net, result = adapt_small(small_folder, Recipe(epochs=2, batch_size=5, on_nonfinite="skip"))
    assert result.skipped_steps == 1
    assert len(result.history) == 2
    assert all(bool(torch.isfinite(t).all()) for t in net.adapter_state().values())
    assert np.isfinite(result.threshold)


def test_json_is_strict(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"threshold": float("nan")})
    assert not (tmp_path / "x.json").exists()


# --- 5. adapters you can check ----------------------------------------------------------------


@pytest.fixture
def adapter(tmp_path, small_folder):
    out = tmp_path / "run"
    assert main(adapt_argv(small_folder, out, *ONE)) == 0
    return out / ADAPTER_FILE


def test_adapter_with_altered_tensor_bytes_is_refused(adapter):
    data = bytearray(adapter.read_bytes())
    data[-3] ^= 0x40  # a byte of the last tensor's data
    adapter.write_bytes(bytes(data))
    with pytest.raises(UeoError, match="do not match the checksum") as info:
        load_adapter(adapter)
    assert "\n" not in str(info.value)


def rewrite_metadata(path: Path, text: str) -> None:
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={"ueo": text})


def test_adapter_metadata_is_validated(adapter):
    good = load_adapter(adapter)[1]
    rewrite_metadata(adapter, "{not json")
    with pytest.raises(UeoError, match="not valid JSON"):
        load_adapter(adapter)
    rewrite_metadata(adapter, json.dumps({k: v for k, v in good.items() if k != "class_names"}))
    with pytest.raises(UeoError, match="misses class_names"):
        load_adapter(adapter)
    rewrite_metadata(adapter, json.dumps(good).replace(str(good["threshold"]), "NaN"))
    with pytest.raises(UeoError, match="not valid JSON"):
        load_adapter(adapter)
    rewrite_metadata(adapter, json.dumps({**good, "class_names": "red"}))
    with pytest.raises(UeoError, match="class_names has the wrong type"):
        load_adapter(adapter)
    rewrite_metadata(adapter, json.dumps(good))
    assert load_adapter(adapter)[1]["class_names"] == CLASSES


# --- 6. no usable image, no matching class -----------------------------------------------------


def test_folder_of_unreadable_images_is_an_error(tmp_path, capsys):
    root = tmp_path / "broken"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.png").write_bytes(b"not a png")
    assert main(adapt_argv(root, tmp_path / "run", *ONE)) == 2
    assert "None of the 4 images of the unlabeled set" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_class_list_matching_no_folder_names_the_closest(tmp_path, small_folder):
    with pytest.raises(UeoError, match="closest folder names: red_square") as info:
        main_raising(adapt_argv(small_folder, tmp_path / "run", *ONE, classes="red squares,dog"))
    assert "\n" not in str(info.value)


# --- 1. fingerprints ---------------------------------------------------------------------------


def test_bench_rerun_with_another_split_recomputes(tmp_path, caplog):
    data = tmp_path / "bench"
    make_folder(data, per_class=2)
    names = [*CLASSES, "black noise"]
    sweep = Sweep(
        model="ueo-tiny-rn",
        pretrained="bundled",
        recipe=Recipe(epochs=1, batch_size=8),
        runtime=Runtime(workers=0, progress=False),
        scenarios=["OPDA"],
        methods=["ueo"],
    )
    out = tmp_path / "sweep"
    first = run_sweep(folder_suite(data, names, known=3), sweep, out)
    assert first[0][1]["num_classes"] == 3
    again = run_sweep(folder_suite(data, names, known=3), sweep, out)
    assert again[0][1]["wall_time_s"] == first[0][1]["wall_time_s"]  # reused, not recomputed
    with caplog.at_level("WARNING", logger="ueo"):
        second = run_sweep(folder_suite(data, names, known=2), sweep, out)
    assert second[0][1]["num_classes"] == 2
    assert "the known/unlabeled/test class split" in caplog.text
    stored = json.loads((second[0][0].path(out) / "metrics.json").read_text())
    assert stored["cell_fingerprint_components"]["split"]["known"] == [0, 1]


def test_weights_identity_follows_a_files_content(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 100)
    first = weights_identity("RN50", str(path))
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(1, 1))
    assert weights_identity("RN50", str(path)) != first
    assert weights_identity("RN50", "openai") == "tag:openai"
    assert weights_identity("ueo-tiny-rn", "bundled").startswith("bundled:sha256:")
