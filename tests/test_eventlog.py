"""`--log tensorboard`: the curves of metrics.json as TensorBoard events, read back with
TensorBoard's own reader."""

import importlib.util
import json

import pytest

from ueo.errors import UeoError
from ueo.jobs import adapt_job
from ueo.recipe import Recipe, Runtime

pytestmark = pytest.mark.usefixtures("single_thread")


def test_tensorboard_events_hold_the_curves_of_metrics_json(image_folder, classes_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    record = adapt_job(
        out,
        model="ueo-tiny-rn",
        pretrained="bundled",
        data=str(image_folder),
        classes=str(classes_file),
        test_data=str(image_folder),
        recipe=Recipe(epochs=2, batch_size=8, lr_prompt=0.01, lr_norm=0.01),
        runtime=Runtime(device="cpu", workers=0, progress=False, eval_every=1, log="tensorboard"),
    )
    assert record == json.loads((out / "metrics.json").read_text())
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def series(tag):
        return {e.step: e.value for e in events.Scalars(tag)}

    for key, value in record["label_free"]["adapted"].items():
        if value is not None:
            steps = series(f"label_free/{key}")
            assert sorted(steps) == [0, 1, 2]
            assert steps[2] == pytest.approx(value, rel=1e-6)
            expected = [c["label_free"][key] for c in record["curves"]]
            assert [steps[e] for e in (0, 1, 2)] == pytest.approx(expected, rel=1e-6)
    for name in ("test", "unlabeled"):
        for metric in ("acc", "auroc", "h"):
            steps = series(f"{name}/{metric}")
            assert [steps[e] for e in (0, 1, 2)] == pytest.approx(
                [c[name][metric] for c in record["curves"]], rel=1e-6
            )
    losses = series("train/loss")
    assert losses == pytest.approx({h["epoch"]: h["loss"] for h in record["history"]}, rel=1e-6)
    assert {"train/lr_prompt", "train/lr_norm"} <= tags


def test_plain_files_write_no_events(image_folder, classes_file, tmp_path):
    out = tmp_path / "run"
    adapt_job(
        out,
        model="ueo-tiny-rn",
        pretrained="bundled",
        data=str(image_folder),
        classes=str(classes_file),
        recipe=Recipe(epochs=1, batch_size=8),
        runtime=Runtime(device="cpu", workers=0, progress=False),
    )
    assert not (out / "tensorboard").exists()
    record = json.loads((out / "metrics.json").read_text())
    assert set(record["label_free"]) == {"zeroshot", "adapted"}


def test_log_option_is_checked_before_anything_runs(monkeypatch):
    with pytest.raises(UeoError, match="--log must be one of files, tensorboard"):
        Runtime(log="wandb").validate()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    with pytest.raises(UeoError, match=r"pip install 'ueo\[tensorboard\]'"):
        Runtime(log="tensorboard").validate()
