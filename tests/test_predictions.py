"""`predict` over the whole set at once: each whole-set computation made once per pass, the rows
held as columns, the CSV as it always was; image paths found by their keys."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from conftest import CLASSES, load_calibrated
from PIL import Image

import ueo.inference
from ueo.api import predict
from ueo.data import ImageSet, load_image_set
from ueo.errors import UeoError
from ueo.inference import Outputs
from ueo.pathkeys import PathIndex, lookup, path_keys
from ueo.predictions import PREDICTION_FIELDS, Predictions
from ueo.recipe import Runtime

pytestmark = pytest.mark.usefixtures("single_thread")

QUIET = Runtime(device="cpu", workers=0, progress=False, eval_batch_size=7)


@pytest.fixture
def counted(monkeypatch):
    """Counts the MCM computations over a set (`Outputs.score`), and the images they span."""
    calls = []
    real = ueo.inference.mcm_score

    def counting(cos):
        calls.append(len(cos))
        return real(cos)

    monkeypatch.setattr(ueo.inference, "mcm_score", counting)
    return calls


def test_predict_computes_the_scores_of_the_set_once_whatever_its_size(image_folder, counted):
    """The quadratic `predict` read `Outputs.score` and `.pred` per image, each recomputed
    over the whole N x K matrix: N calls for N images. Once per pass, at any N."""
    model = load_calibrated("test-tiny-rn")
    images = load_image_set(image_folder, CLASSES)
    for n in (6, len(images)):
        counted.clear()
        rows = predict(model, images.subset(np.arange(n)), threshold=0.26, runtime=QUIET)
        assert len(rows) == n and counted == [n]


def test_outputs_compute_pred_and_score_once(counted):
    out = Outputs(np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32), np.ones(50))
    first = out.score
    assert out.score is first and out.pred is out.pred and counted == [50]
    assert np.array_equal(out.pred, out.cos.argmax(axis=1))


# Just above float32(0.3) in float64: a float32 comparison would round it to float32(0.3).
ABOVE = float(np.nextafter(float(np.float32(0.3)), 1.0))


def _predictions(n: int = 5, threshold: float = ABOVE) -> Predictions:
    rng = np.random.default_rng(1)
    paths = [f"img {i}.png" for i in range(n + 2)]
    rows = np.array([0, 2, 3, 5, 6])[:n]
    return Predictions(
        paths,
        rows,
        ["cat", "dog", "fox"],
        rng.integers(0, 3, n),
        rng.random(n).astype(np.float32),
        np.array([0.1, 0.3, 0.30000001, 0.9, 0.5], np.float32)[:n],
        threshold,
    )


def test_predictions_read_as_rows_and_write_the_csv_of_a_dict_writer():
    preds = _predictions()
    rows = list(preds)
    assert len(preds) == 5 and rows[1] == preds[1] and preds[-1] == rows[4]
    assert preds[1:3] == rows[1:3] and list(rows[0]) == list(PREDICTION_FIELDS)
    assert rows[1]["path"] == "img 2.png" and rows[1]["pred"] in ("cat", "dog", "fox")
    assert isinstance(rows[1]["prob"], float) and isinstance(rows[1]["is_unknown"], bool)
    # MCM against the threshold as Python floats compare them (`ueo predict` always did).
    assert [r["is_unknown"] for r in rows] == [True, True, True, False, False]
    assert [r["mcm"] < ABOVE for r in rows] == [r["is_unknown"] for r in rows]
    with pytest.raises(IndexError):
        preds[5]
    expected = io.StringIO()  # what `ueo predict` wrote before its rows were columns
    writer = csv.DictWriter(expected, fieldnames=list(PREDICTION_FIELDS))
    writer.writeheader()
    writer.writerows(rows)
    assert _written(preds) == expected.getvalue()


def _written(preds: Predictions) -> str:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        out = preds.write_csv(Path(tmp) / "p.csv")
        return out.read_bytes().decode()


def test_predict_rows_equal_the_outputs_of_the_pass(image_folder):
    model = load_calibrated("test-tiny-rn")
    images = load_image_set(image_folder, CLASSES)
    out = ueo.inference.infer(model, images, QUIET)
    rows = predict(model, images, threshold=0.26, runtime=QUIET)
    probs = torch.softmax(100 * torch.from_numpy(out.cos), dim=1).numpy()
    for i, row in enumerate(rows):
        assert row["pred"] == CLASSES[out.pred[i]] and row["mcm"] == float(out.score[i])
        assert row["prob"] == pytest.approx(float(probs[i, out.pred[i]]), abs=1e-6)


def test_a_path_index_finds_each_path_and_names_a_missing_one():
    paths = [f"/data/{i % 7}/{i}.png" for i in range(1000)]
    index = PathIndex(paths)
    wanted = [paths[i] for i in (999, 0, 500, 500)]
    assert index.positions(wanted).tolist() == [999, 0, 500, 500]
    with pytest.raises(KeyError, match="nowhere"):
        index.positions(["/data/nowhere.png"])
    keys = np.sort(path_keys(paths[:3]))
    assert lookup(keys, path_keys(["x", paths[1]])).tolist()[0] == -1
    assert ImageSet(paths, np.zeros(1000)).subset(index.positions(wanted)).paths == wanted


def test_images_in_memory_give_the_rows_of_ueo_predict(tmp_path):
    """A service's PIL images (any mode) or N x H x W x 3 array: the rows of `ueo predict` on
    the same images as files, to the last digit."""
    from conftest import draw, untrained_run

    from ueo.api import load_adapted
    from ueo.data import MemoryImages
    from ueo.jobs import predict_job

    run = untrained_run(tmp_path)
    folder = tmp_path / "shots"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(7):
        draw((CLASSES * 2)[i], rng).save(folder / f"{i}.png")
    palette = draw("black noise", rng).convert("P")
    palette.info["transparency"] = 0  # composited on white, from a file or from memory
    palette.save(folder / "7.png", transparency=0)
    predict_job(run["adapter"], str(folder), tmp_path / "p.csv", runtime=QUIET)
    with open(tmp_path / "p.csv", newline="") as f:
        expected = [(r["pred"], r["prob"], r["mcm"], r["is_unknown"]) for r in csv.DictReader(f)]
    model, meta = load_adapted(run["adapter"])
    files = sorted(folder.iterdir(), key=lambda p: int(p.stem))
    pil = []
    for path in files:
        with Image.open(path) as img:
            img.load()
            pil.append(img)
    array = np.stack([np.asarray(img.convert("RGB")) for img in pil[:7]])

    def rows(images):
        found = predict(model, images, meta["threshold"], QUIET)
        return [(r["pred"], str(r["prob"]), str(r["mcm"]), str(r["is_unknown"])) for r in found]

    assert rows(pil) == expected and pil[7].mode == "P"
    assert rows(array) == expected[:7]
    named = predict(model, MemoryImages(array[:2], ["a.jpg", "b.jpg"]), 0.5, QUIET)
    assert [r["path"] for r in named] == ["a.jpg", "b.jpg"]
    assert [r["path"] for r in predict(model, pil[:2], 0.5, QUIET)] == ["0", "1"]
    with pytest.raises(UeoError, match="N x H x W x 3 uint8"):
        predict(model, array.astype(np.float32), 0.5, QUIET)
