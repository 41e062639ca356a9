"""Unlabeled images as users hold them: a plain list of paths, the paths on standard input,
and a tree of folders that are not classes (`--unlabeled`); evaluation refuses all three."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CLASSES, draw, untrained_run
from PIL import Image

from ueo.cli import main
from ueo.data import OOD, UNLABELED, load_image_set
from ueo.errors import UeoError

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = ["--workers", "0", "--quiet"]


def photos(root, names):
    """Small images at `root/<name>` (folders made), in the given order."""
    rng = np.random.default_rng(0)
    paths = []
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        draw((CLASSES * 2)[i % 8], rng).save(path)
        paths.append(path)
    return paths


def error_of(capsys, argv) -> str:
    """Exit code 2 and one `ueo: error:` line, the last on stderr, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert sum("ueo: error:" in ln for ln in lines) == 1 and lines[-1].startswith("ueo: error:")
    return lines[-1]


# --- a plain list of paths ------------------------------------------------------------------


def test_a_list_of_paths_without_labels_is_an_unlabeled_set(tmp_path):
    a, b, c = photos(tmp_path, ["x/a.png", "y y/b.png", "c.png"])
    listing = tmp_path / "list.txt"
    listing.write_text(f"# made by find\nx/a.png\n\n{b}\n  c.png  \n")
    images = load_image_set(listing, CLASSES)
    assert images.paths == [str(a), str(b), str(c)]  # relative under the list's folder
    assert (images.labels == UNLABELED).all() and not images.labelled
    other = tmp_path / "other"
    other.mkdir()
    moved = load_image_set(listing, CLASSES, data_root=tmp_path)
    assert moved.paths == images.paths


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        ("a.png 0\nb.png\n", 2, "expected 'relative/path label'"),
        ("a.png 1\n# note\nb.png 1.5\n", 3, "expected 'relative/path label'"),
        ("a.png\nb.png 3\n", 2, "ends in a label, but line 1 has none"),
    ],
)
def test_a_list_mixing_labelled_and_plain_lines_is_refused_at_the_first_that_differs(
    tmp_path, text, line, says
):
    photos(tmp_path, ["a.png", "b.png"])
    listing = tmp_path / "list.txt"
    listing.write_text(text)
    with pytest.raises(UeoError, match=rf"list\.txt:{line}: .*{says}") as err:
        load_image_set(listing, CLASSES)
    assert "all 'path label' lines or all plain paths" in str(err.value)


def test_paths_of_an_unlabeled_list_that_do_not_exist_are_left_out_with_one_warning(
    tmp_path, caplog
):
    photos(tmp_path, ["a.png", "b.png"])
    listing = tmp_path / "list.txt"
    listing.write_text("a.png\ngone.png\nb.png\nalso-gone.png\n")
    with caplog.at_level(logging.WARNING, logger="ueo"):
        images = load_image_set(listing, CLASSES)
    assert [os.path.basename(p) for p in images.paths] == ["a.png", "b.png"]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "2 of the 4" in warned[0] and "gone.png" in warned[0]
    listing.write_text("gone.png\n")
    with pytest.raises(UeoError, match="None of the 1 image"):
        load_image_set(listing, CLASSES)
    labelled = tmp_path / "labelled.txt"  # a labelled list must be whole, as before
    labelled.write_text("a.png 0\ngone.png 1\n")
    with pytest.raises(UeoError, match="1 image.* do not exist"):
        load_image_set(labelled, CLASSES)


def test_unlabeled_drops_a_lists_labels(tmp_path):
    photos(tmp_path, ["a.png", "b.png"])
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 0\nb.png 7\n")
    assert load_image_set(listing, CLASSES).labels.tolist() == [0, OOD]
    assert load_image_set(listing, CLASSES, unlabeled=True).labels.tolist() == [UNLABELED] * 2


# --- standard input -------------------------------------------------------------------------


def test_standard_input_is_read_as_a_list(tmp_path, monkeypatch, caplog):
    a, b = photos(tmp_path, ["a.png", "sub/b.png"])
    monkeypatch.chdir(tmp_path)
    stdin = io.StringIO(f"a.png\n{b}\nmissing.png\n")
    with caplog.at_level(logging.WARNING, logger="ueo"):
        images = load_image_set("-", CLASSES, stdin=stdin)
    assert images.paths == ["a.png", str(b)] and images.source == "standard input"
    assert "missing.png" in caplog.text and "standard input" in caplog.text
    with pytest.raises(UeoError, match="standard input has no entries"):
        load_image_set("-", CLASSES, stdin=io.StringIO("\n# nothing\n"))


def test_find_piped_into_predict(tmp_path):
    """`find ... | ueo predict --data -`, a real pipe into a real process: a row per image;
    a path that does not exist is said in one line and the others are read; an empty
    standard input is one error line."""
    run = untrained_run(tmp_path)
    shots = photos(tmp_path / "photos", ["2026-11-03/a.png", "2026-11-04/b.png", "c.png"])
    out = tmp_path / "preds.csv"
    argv = [sys.executable, "-m", "ueo", "predict", "--adapter", str(run["adapter"])]
    argv += ["--data", "-", "--out", str(out), *FAST]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    listing = "".join(f"{p}\n" for p in shots) + f"{tmp_path / 'nowhere.png'}\n"
    done = subprocess.run(argv, input=listing, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(p) for p in shots]
    assert "3 images" in done.stdout
    notes = [ln for ln in done.stderr.splitlines() if "nowhere.png" in ln]
    assert len(notes) == 1 and "do not exist" in notes[0]
    done = subprocess.run(argv, input="", capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "ueo: error: Image list standard input has no entries."
    ]


def test_standard_input_under_torchrun_is_refused_before_anything_runs(
    tmp_path, monkeypatch, capsys
):
    run = untrained_run(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = ["predict", "--adapter", str(run["adapter"]), "--data", "-"]
    msg = error_of(capsys, [*argv, "--out", str(tmp_path / "p.csv"), *FAST])
    assert "standard input" in msg and "write the list to a file" in msg


# --- a tree whose folders are not classes ---------------------------------------------------


def test_unlabeled_reads_every_image_of_a_nested_tree_in_sorted_order(tmp_path):
    names = ["cam-b/2026-11-04/z.png", "cam-a/2026-11-03/y.png", "cam-a/x.png", "top.png"]
    names += ["cam-a/2026-11-03/deeper/w.jpg", "cam-a-2/v.png"]
    photos(tmp_path, names)
    (tmp_path / "cam-a" / "notes.txt").write_text("not an image")
    (tmp_path / "cam-a" / ".hidden.png").write_bytes(b"")
    images = load_image_set(tmp_path, CLASSES, unlabeled=True)
    relative = [os.path.relpath(p, tmp_path) for p in images.paths]
    assert relative == [
        "cam-a/2026-11-03/deeper/w.jpg",
        "cam-a/2026-11-03/y.png",
        "cam-a/x.png",
        "cam-a-2/v.png",
        "cam-b/2026-11-04/z.png",
        "top.png",
    ]  # the order of the paths' parts: a folder's images before a sibling's
    assert (images.labels == UNLABELED).all()
    # Read as a class tree, the same folder would leave "top.png" out and label the rest OOD.
    assert (load_image_set(tmp_path, CLASSES).labels == OOD).all()


def test_adapt_on_dated_folders_needs_unlabeled_and_says_so(tmp_path, capsys):
    photos(tmp_path / "photos", [f"2026-11-0{d}/{i}.png" for d in (3, 4) for i in range(4)])
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    argv = ["adapt", "--model", "test-tiny-rn", "--pretrained", "none", "--classes", str(classes)]
    argv += ["--data", str(tmp_path / "photos"), "--epochs", "1", "--batch-size", "4", *FAST]
    msg = error_of(capsys, [*argv, "--out", str(tmp_path / "r1")])
    assert "is on the class list" in msg and "add --unlabeled" in msg
    assert main([*argv, "--out", str(tmp_path / "r2"), "--unlabeled"]) == 0
    record = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert record["unlabeled"] is True and record["identity"]["unlabeled"]
    assert record["zeroshot"]["unlabeled"] is None  # no labels: no metrics


def test_predict_and_discover_read_a_tree_with_unlabeled(tmp_path, capsys):
    run = untrained_run(tmp_path)
    shots = photos(tmp_path / "photos", ["b/2.png", "a/1.png", "a/0/3.png"])
    base = ["--adapter", str(run["adapter"]), "--data", str(tmp_path / "photos"), "--unlabeled"]
    assert main(["predict", *base, "--out", str(tmp_path / "p.csv"), *FAST]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    assert paths == [str(shots[2]), str(shots[1]), str(shots[0])]
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("kite\nlamp\nboat\n")
    argv = ["discover", *base, "--vocabulary", str(vocabulary), "--threshold", "1"]
    assert main([*argv, "--out", str(tmp_path / "found"), *FAST]) == 0
    assert "3 of 3 images rejected" in capsys.readouterr().out


# --- evaluation needs labels ----------------------------------------------------------------


def test_eval_refuses_unlabeled_data_in_one_line(tmp_path, capsys):
    run = untrained_run(tmp_path)
    base = ["eval", "--adapter", str(run["adapter"]), *FAST]
    msg = error_of(capsys, [*base, "--data", run["data"], "--unlabeled"])
    assert "labels" in msg and "--unlabeled" in msg
    listing = tmp_path / "plain.txt"
    shot = photos(tmp_path, ["x.png"])[0]
    listing.write_text(f"{shot}\n")
    msg = error_of(capsys, [*base, "--data", str(listing)])
    assert "carries no labels" in msg and "ueo eval measures the predictions" in msg
    zeroshot = ["eval", "--zeroshot", "--model", "ueo-tiny-rn", "--pretrained", "bundled"]
    zeroshot += ["--classes", run["classes"], "--data", "-", *FAST]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys, "stdin", io.StringIO(f"{shot}\n"))
        assert "carries no labels" in error_of(capsys, zeroshot)


def test_a_test_set_without_labels_is_refused(tmp_path, capsys, image_folder, classes_file):
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "a.png")
    argv = ["adapt", "--model", "test-tiny-rn", "--pretrained", "none", *FAST]
    argv += ["--data", str(image_folder), "--classes", str(classes_file), "--test-data"]
    msg = error_of(capsys, [*argv, str(loose), "--out", str(tmp_path / "r")])
    assert "--test-data" in msg and "carries no labels" in msg
