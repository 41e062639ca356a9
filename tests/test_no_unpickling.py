"""Unpickling never runs code: every path that loads a file is handed a pickle that would.

The payload writes a marker file when unpickled. Each test first shows that the payload is
real (an ordinary unpickler runs it), then that ueo refuses the file with one `ueo: error:`
line, exit code 2 (or a UeoError in Python), and that the marker was never written.
"""

from __future__ import annotations

import gzip
import inspect
import pickle
import shutil
import warnings

import numpy as np
import open_clip
import pytest
import torch
from conftest import untrained_run

from ueo.bench.scores import SCORES_FILE, load_scores
from ueo.cli import main
from ueo.demo import testbed
from ueo.errors import UeoError
from ueo.layout import ADAPTER_FILE
from ueo.runs import load_adapter, save_adapter

pytestmark = pytest.mark.usefixtures("single_thread")


class Payload:
    """Unpickling this writes `marker`: the code an attacker would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "unpickled code ran"


def evil_pickle(path, marker, *, torch_format=False):
    """A file that runs code when unpickled: plain pickle, or torch.save's zip format."""
    if torch_format:
        torch.save({"visual.proj": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"visual.proj": Payload(marker)}))
    return path


def test_the_payload_is_real(tmp_path):
    """Without the guards, loading these files runs the code: the tests below can fail."""
    for torch_format in (False, True):
        marker = tmp_path / f"ran-{torch_format}"
        path = evil_pickle(tmp_path / f"evil-{torch_format}.pt", marker, torch_format=torch_format)
        if torch_format:
            torch.load(path, weights_only=False)
        else:
            pickle.loads(path.read_bytes())
        assert marker.read_text() == "ran"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A labelled folder, a class file and a real tiny adapter (no training)."""
    return untrained_run(tmp_path_factory.mktemp("unpickle"))


def refused(argv, capsys, *words) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("ueo: error: "), err
    for word in words:
        assert word in err[0], err[0]
    return err[0]


def eval_argv(setup, adapter, *extra):
    return ["eval", "--adapter", adapter, "--data", setup["data"], "--workers", "0", *extra]


def test_open_clip_loads_checkpoints_with_weights_only():
    """open_clip 3.3's loaders default to weights_only=True and ueo never overrides it."""
    for fn in (
        open_clip.create_model,
        open_clip.load_checkpoint,
        open_clip.factory.load_state_dict,
    ):
        assert inspect.signature(fn).parameters["weights_only"].default is True, fn


@pytest.mark.parametrize("name", ["evil.safetensors", "dir"])
def test_adapter_that_is_a_pickle(setup, capsys, marker, tmp_path, name):
    if name == "dir":
        (tmp_path / "dir").mkdir()
        evil_pickle(tmp_path / "dir" / ADAPTER_FILE, marker)
    else:
        evil_pickle(tmp_path / name, marker)
    refused(eval_argv(setup, tmp_path / name), capsys, "not a readable safetensors adapter")
    argv = ["predict", "--adapter", tmp_path / name, "--images", setup["data"]]
    refused(argv + ["--out", tmp_path / "p.csv"], capsys, "safetensors")


@pytest.mark.parametrize("name, torch_format", [("evil.pt", True), ("evil.bin", False)])
def test_pretrained_checkpoint_that_is_a_pickle(
    setup, capsys, marker, tmp_path, name, torch_format
):
    evil = evil_pickle(tmp_path / name, marker, torch_format=torch_format)
    argv = ["adapt", "--model", "ueo-tiny-rn", "--pretrained", evil, "--data", setup["data"]]
    argv += ["--classes", setup["classes"], "--out", tmp_path / "run", "--workers", "0", "--quiet"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = refused(argv, capsys, f"Checkpoint file {evil} is not plain tensors", "never")
        refused(eval_argv(setup, setup["adapter"], "--pretrained", evil), capsys, str(evil))
    # ueo's one line is all: no PyTorch warning first, and no advice to unpickle the file.
    assert [str(w.message) for w in caught] == []
    assert "weights_only=False" not in line and "trust" not in line
    assert not (tmp_path / "run" / ADAPTER_FILE).exists()


def test_numpy_checkpoint_with_object_arrays(setup, capsys, marker, tmp_path):
    evil = tmp_path / "evil.npz"
    np.savez(evil, w=np.array([Payload(marker)], dtype=object))
    refused(eval_argv(setup, setup["adapter"], "--pretrained", evil), capsys, str(evil))


def test_adapter_metadata_pointing_at_a_pickle(setup, capsys, marker, tmp_path):
    evil = evil_pickle(tmp_path / "base.pt", marker, torch_format=True)
    tensors, meta = load_adapter(setup["adapter"])
    forged = tmp_path / "forged.safetensors"
    save_adapter(forged, tensors, {**meta, "pretrained": str(evil)})
    refused(eval_argv(setup, forged), capsys, str(evil))
    argv = ["predict", "--adapter", forged, "--images", setup["data"]]
    refused(argv + ["--out", tmp_path / "p.csv", "--workers", "0"], capsys, str(evil))
    assert not (tmp_path / "p.csv").exists()


def test_class_and_list_files_that_are_pickles(setup, capsys, marker, tmp_path):
    evil = evil_pickle(tmp_path / "evil.txt", marker)
    argv = ["adapt", "--model", "ueo-tiny-rn", "--pretrained", "bundled", "--quiet"]
    argv += ["--out", tmp_path / "r"]
    refused(argv + ["--data", setup["data"], "--classes", evil], capsys, "Class file", "UTF-8")
    refused(argv + ["--data", evil, "--classes", setup["classes"]], capsys, "Image list", "UTF-8")
    refused(eval_argv(setup, setup["adapter"])[:-4] + ["--data", evil], capsys, "Image list")


def test_image_that_is_a_pickle_is_a_bad_image(setup, capsys, marker, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(setup["data"], folder)
    evil_pickle(folder / "red_square" / "evil.png", marker)
    argv = eval_argv(setup, setup["adapter"], "--on-bad-image", "error", "--quiet")
    argv[argv.index(setup["data"])] = folder
    refused(argv, capsys, "Unreadable image", "evil.png")


def test_scores_file_with_object_arrays(tmp_path, marker):
    np.savez(tmp_path / SCORES_FILE, label=np.array([Payload(marker)], dtype=object))
    with pytest.raises(UeoError, match="not a file of plain score arrays"):
        load_scores(tmp_path)
    evil_pickle(tmp_path / SCORES_FILE, marker)
    with pytest.raises(UeoError, match="not a file of plain score arrays"):
        load_scores(tmp_path)


def test_testbed_array_pickle_refuses_other_globals(tmp_path, marker):
    path = tmp_path / "animal_data.gz"
    with gzip.open(path, "wb") as f:
        f.write(pickle.dumps(Payload(marker)))
    with pytest.raises(UeoError, match="refusing to load global builtins.exec"):
        testbed._load_array_pickle(path)
    with gzip.open(path, "wb") as f:
        f.write(pickle.dumps(np.arange(3, dtype=np.uint8)))
    assert testbed._load_array_pickle(path).tolist() == [0, 1, 2]
