"""`ueo export` and `python -m ueo.deploy`: the exported graph, run without torch, gives `ueo
predict`'s answers; plain open_clip with the exported weights and head gives ueo's cosines;
bad input is one line; an export is published whole.

The tiny bundled models (a BatchNorm tower and a LayerNorm one) are adapted for one epoch on a
folder made here, so the exported affines and prompt are really tuned ones.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, add_bad_images, make_folder
from PIL import Image
from safetensors.torch import load_file, save_file

import ueo.export
from ueo.api import load_adapted
from ueo.cache import split_transform
from ueo.cli import main
from ueo.clip import test_transform as clip_test_transform
from ueo.data import ImageSet, load_image_set
from ueo.demo.zoo import bundled_checkpoint
from ueo.deploy import load_exported, pixels, predict_files
from ueo.deploy import main as deploy_main
from ueo.errors import UeoError
from ueo.export import export_adapter, open_clip_config
from ueo.images import open_rgb
from ueo.inference import infer
from ueo.jobs import adapt_job, predict_job
from ueo.names import UNLABELED
from ueo.recipe import Recipe, Runtime
from ueo.runs import load_adapter

pytestmark = pytest.mark.usefixtures("single_thread")

SRC = Path(__file__).resolve().parents[1] / "src"
MODELS = ("ueo-tiny-rn", "ueo-tiny-vit")
RUNTIME = Runtime(device="cpu", workers=0, progress=False)
NEAR = 1e-6  # an image whose MCM lies this close to the threshold may be flagged either way
PYTHON_ENV = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A labelled folder of our own making: 4 known classes and an unknown one, images of
    many sizes, aspect ratios and modes, a large JPEG (decoded at a reduced scale), and two
    unreadable files."""
    root = tmp_path_factory.mktemp("export") / "images"
    make_folder(root, per_class=4)
    rng = np.random.default_rng(5)
    folder = root / "red_square"
    for i, (w, h) in enumerate([(97, 41), (20, 300), (33, 31), (1600, 1200), (300, 17)]):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(folder / f"odd{i}.jpg" if w >= 1000 else folder / f"odd{i}.png")
    rgba = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA")
    rgba.save(root / "blue_stripes" / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (45, 60), dtype=np.uint8)).save(
        root / "yellow_cross" / "gray.png"
    )
    Image.fromarray(rng.integers(0, 65535, (40, 44), dtype=np.uint16)).save(
        root / "green_circle" / "deep.png"
    )
    Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).convert("P").save(
        root / "black_noise" / "palette.png"
    )
    add_bad_images(root)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory, images) -> dict[str, dict]:
    """Per tiny model: a run adapted one epoch on `images`, and its export (fp32)."""
    root = tmp_path_factory.mktemp("exports")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    found = {}
    try:
        for name in MODELS:
            run = root / "runs" / name
            adapt_job(
                run,
                model=name,
                pretrained="bundled",
                data=str(images),
                classes=str(root / "classes.txt"),
                recipe=Recipe(epochs=1, batch_size=8, lr_prompt=0.05, lr_norm=0.05),
                runtime=RUNTIME,
            )
            out = root / "exports" / name
            found[name] = {"run": run, "out": out, "record": export_adapter(run, out)}
    finally:
        torch.set_num_threads(threads)
    return found


def readable(images: Path) -> list[str]:
    """The paths of the folder's images but the two unreadable files (`add_bad_images`)."""
    paths = load_image_set(str(images), CLASSES).paths
    return [p for p in paths if not p.endswith(("truncated.png", "text.jpg"))]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --- the pixels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 224])
def test_pillow_pixels_are_the_test_transforms(size):
    """Resize's shorter side, its truncated longer side, the skipped resize of a right-sized
    image, the centre crop's rounding: bit for bit torchvision's on PIL images."""
    split = split_transform(clip_test_transform(size))
    rng = np.random.default_rng(size)
    shapes = [(size, size), (size + 1, size), (size + 3, size), (33, 31), (1, 500), (500, 1)]
    shapes += [
        (17, 64),
        (1000, 999),
        (225, 224),
        (100, 37),
        (3, 3),
        (641, 479),
        (size, 3 * size + 1),
    ]
    for w, h in shapes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = split.pixels(img).numpy()
        got = pixels(img, size)
        assert got.dtype == np.uint8 and got.shape == (3, size, size)
        assert np.array_equal(got, want), (w, h)


# --- the runner against ueo predict ------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_the_runner_gives_ueo_predicts_answers(name, exported, images, tmp_path, capsys):
    one = exported[name]
    theirs, ours = tmp_path / "predict.csv", tmp_path / "deploy.csv"
    summary = predict_job(str(one["run"]), str(images), theirs, runtime=RUNTIME)
    assert deploy_main([str(one["out"]), str(images), "--out", str(ours), "--quiet"]) == 0
    assert "2 unreadable image(s) skipped" in capsys.readouterr().err
    a, b = read_csv(ours), read_csv(theirs)
    assert summary["skipped"] == 2 and len(a) == len(b) == summary["images"]
    assert [r["path"] for r in a] == [r["path"] for r in b]
    threshold = one["record"]["threshold"]
    flags = {r["is_unknown"] for r in b}
    assert flags == {"True", "False"}, "both answers must occur for the test to mean anything"
    for x, y in zip(a, b, strict=True):
        if abs(float(y["mcm"]) - threshold) > NEAR:
            assert (x["pred"], x["is_unknown"]) == (y["pred"], y["is_unknown"]), x["path"]
        assert abs(float(x["prob"]) - float(y["prob"])) <= 1e-4
        assert abs(float(x["mcm"]) - float(y["mcm"])) <= 1e-5


def test_thresholds_are_compared_in_float64(exported, images, tmp_path):
    """A threshold just above an image's MCM (equal to it in float32) flags that image unknown,
    as `ueo predict` does: in the runner (`--threshold`) and in the graph (the adapter's)."""
    one = exported["ueo-tiny-rn"]
    model = load_exported(one["out"], threads=1)
    image_set = load_image_set(str(images), model.class_names)
    rows = predict_files(model, image_set)
    middle = float(np.median(rows.mcm))  # a float32 value, exactly representable
    above = float(np.nextafter(middle, 1.0))
    assert np.float32(above) == np.float32(middle)
    again = predict_files(model, image_set, threshold=above, batch_size=5)
    at = rows.mcm == np.float32(middle)
    assert at.any() and again.is_unknown[at].all()
    assert np.array_equal(again.mcm, rows.mcm) and np.array_equal(again.pred, rows.pred)
    adapter = tmp_path / "adapter.safetensors"  # the same adapter with that threshold
    tensors, meta = load_adapter(one["run"])
    save_file(tensors, str(adapter), metadata={"ueo": json.dumps({**meta, "threshold": above})})
    export_adapter(adapter, tmp_path / "x")
    graph = load_exported(tmp_path / "x", threads=1)
    assert graph.threshold == above
    flagged = predict_files(graph, image_set)
    assert np.array_equal(flagged.is_unknown, again.is_unknown)
    paths = [image_set.paths[r] for r in rows.rows[at]]
    out = graph(np.stack([pixels(open_rgb(p), 32) for p in paths]))
    assert out["is_unknown"].all() and (out["mcm"] == np.float32(middle)).all()


def test_the_graph_answers_with_its_metadata(exported, images):
    one = exported["ueo-tiny-rn"]
    _, meta = load_adapter(one["run"])
    model = load_exported(one["out"] / "model.onnx", threads=1)  # the file alone
    assert model.class_names == meta["class_names"] and model.threshold == meta["threshold"]
    assert model.input_size == 32 and model.metadata["resize"].startswith("shorter side")
    assert model.metadata["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    paths = readable(images)[:7]
    batch = np.stack([pixels(open_rgb(p), 32) for p in paths])
    out = model(batch)
    assert np.array_equal(out["pred"], out["probs"].argmax(axis=1))
    assert np.allclose(out["probs"].sum(axis=1), 1, atol=1e-6)
    assert np.array_equal(out["is_unknown"], out["mcm"].astype(np.float64) < meta["threshold"])
    for i in range(len(paths)):  # the batch axis is dynamic: one image gives its row
        single = model(batch[i : i + 1])
        assert np.allclose(single["mcm"], out["mcm"][i : i + 1], atol=1e-6)


# --- plain open_clip ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_open_clip(exported, images, tmp_path_factory) -> dict[str, list[np.ndarray]]:
    """Per model, the cosines plain open_clip gives in a fresh interpreter that never imports
    ueo: by `add_model_config` and `create_model_and_transforms(name, pretrained=file)`, and
    by the `local-dir:` folder; the images as ueo reads them (`open_rgb`), saved as RGB PNGs."""
    tmp = tmp_path_factory.mktemp("plain")
    files = []
    for i, p in enumerate(readable(images)):
        open_rgb(p).save(tmp / f"{i:03d}.png")
        files.append(str(tmp / f"{i:03d}.png"))
    specs = {}
    for name in MODELS:
        folder = exported[name]["out"] / "open_clip"
        weights = str(folder / "open_clip_model.safetensors")
        specs[name] = (str(folder / f"{name}.json"), weights, str(folder))
    code = f"""
        import sys, numpy as np, open_clip, torch
        import torch.nn.functional as F
        from PIL import Image
        from safetensors.torch import load_file
        for name, (config, weights, folder) in {specs!r}.items():
            open_clip.add_model_config(config)
            head = load_file(folder + "/head.safetensors")["text_features"]
            for i, spec in enumerate([(name, weights), ("local-dir:" + folder, None)]):
                model, _, preprocess = open_clip.create_model_and_transforms(*spec)
                model.eval()
                with torch.no_grad():
                    x = torch.stack([preprocess(Image.open(p)) for p in {files!r}])
                    cos = F.normalize(model.encode_image(x), dim=-1) @ head.T
                np.save({str(tmp)!r} + f"/{{name}}-{{i}}.npy", cos.numpy())
        assert not [m for m in sys.modules if m == "ueo" or m.startswith("ueo.")]
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
        cwd=tmp,
    )
    assert done.returncode == 0, done.stderr
    found = {n: [np.load(tmp / f"{n}-{i}.npy") for i in range(2)] for n in MODELS}
    return {"files": files, **found}


@pytest.mark.parametrize("name", MODELS)
def test_plain_open_clip_gives_ueos_cosines(name, exported, plain_open_clip):
    one, files = exported[name], plain_open_clip["files"]
    model, _ = load_adapted(one["run"], "cpu")
    want = infer(model, ImageSet(files, np.full(len(files), UNLABELED)), RUNTIME).cos
    for cos in plain_open_clip[name]:
        assert np.abs(cos - want).max() <= 1e-5
    # The exported weights hold the adapted affines, not the bundled ones; the head is the
    # adapted prompts' text features.
    folder = one["out"] / "open_clip"
    state = load_file(str(folder / "open_clip_model.safetensors"))
    tuned, _ = load_adapter(one["run"])
    base = load_file(str(bundled_checkpoint(name)))
    affines = [k for k in tuned if k.startswith("visual.")]
    assert affines and all(torch.equal(state[k], tuned[k]) for k in affines)
    assert any(not torch.equal(state[k], base[k].float()) for k in affines)
    with torch.no_grad():
        text = model.text_features()
    head = load_file(str(folder / "head.safetensors"))["text_features"]
    assert torch.allclose(head, text, atol=1e-6)


def test_the_config_says_quick_gelu_when_the_network_has_it(tmp_path):
    """OpenAI's weights by tag are built with QuickGELU, which a plain config would not give:
    the exported config builds the activation the network had (read by open_clip as a
    `local-dir:` folder: nothing added to its registry of names)."""
    import open_clip

    for quick in (False, True):
        net = open_clip.create_model("test-tiny-vit", pretrained=None, force_quick_gelu=quick)
        config = open_clip_config(net, "test-tiny-vit")
        assert config.get("quick_gelu", False) is quick
        folder = tmp_path / str(quick)
        folder.mkdir()
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
        again = open_clip.create_model(f"local-dir:{folder}")
        acts = {type(m).__name__ for m in again.modules()} & {"QuickGELU", "GELU"}
        assert acts == {"QuickGELU" if quick else "GELU"}


# --- no torch -----------------------------------------------------------------------------------

BLOCKER = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "open_clip", "sklearn", "scipy"):
            raise ImportError(f"{name} is blocked: the runner must not import it")
sys.meta_path.insert(0, Blocked())
"""


def test_the_runner_works_with_torch_blocked(exported, images, tmp_path):
    """`python -m ueo.deploy` in a process where importing torch (or open_clip, torchvision,
    scikit-learn, scipy) raises: the same CSV as the runner here."""
    one = exported["ueo-tiny-vit"]
    here, there = tmp_path / "here.csv", tmp_path / "there.csv"
    assert deploy_main([str(one["out"]), str(images), "--out", str(here), "--quiet"]) == 0
    code = BLOCKER + textwrap.dedent(
        f"""
        import runpy
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not block")
        sys.argv = ["ueo.deploy", {str(one["out"])!r}, {str(images)!r}, "--out",
                    {str(there)!r}, "--quiet"]
        runpy.run_module("ueo.deploy", run_name="__main__")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=PYTHON_ENV
    )
    assert done.returncode == 0, done.stderr
    assert "2 unreadable image(s) skipped" in done.stderr
    assert there.read_bytes() == here.read_bytes()


# --- the record ---------------------------------------------------------------------------------


def test_export_json_records_every_file_and_the_source(exported):
    one = exported["ueo-tiny-rn"]
    out, record = one["out"], json.loads((one["out"] / "export.json").read_text())
    assert record == one["record"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(record["files"]) == [f for f in files if f != "export.json"]
    for name, digest in record["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    _, meta = load_adapter(one["run"])
    metrics = json.loads((one["run"] / "metrics.json").read_text())
    source = record["source"]
    adapter_bytes = (one["run"] / "adapter.safetensors").read_bytes()
    assert source["adapter_sha256"] == hashlib.sha256(adapter_bytes).hexdigest()
    assert source["tensors_sha256"] == meta["tensors_sha256"]
    assert source["run_fingerprint"] == metrics["fingerprint"]
    assert source["run_identity"] == metrics["identity"]
    assert record["threshold"] == meta["threshold"] and record["logit_scale"] == 100
    assert record["mcm_temperature"] == 1 and record["class_names"] == meta["class_names"]
    check = record["self_check"]
    assert check["checked"] and check["max_abs_probs"] <= 1e-4 and check["max_abs_mcm"] <= 1e-5
    assert (out / "classes.txt").read_text().splitlines() == meta["class_names"]
    readme = (out / "README.md").read_text()
    assert "python -m ueo.deploy" in readme and "local-dir:open_clip" in readme


def test_the_exports_readme_runs(exported, images, monkeypatch):
    """The README's ONNX and open_clip snippets, run in the export folder as written, give the
    graph's answers and ueo's cosines for an image."""
    import re

    one = exported["ueo-tiny-rn"]
    path = readable(images)[0]
    monkeypatch.chdir(one["out"])
    blocks = re.findall(r"```python\n(.*?)```", (one["out"] / "README.md").read_text(), re.S)
    assert len(blocks) == 2
    names = {"pixels": pixels(open_rgb(path), 32)[None], "img": open_rgb(path)}
    with torch.no_grad():
        for block in blocks:
            exec(block, names)
    model, _ = load_adapted(one["run"], "cpu")
    want = infer(model, ImageSet([path], np.full(1, UNLABELED)), RUNTIME).cos
    assert names["names"] == model.class_names
    assert np.abs(names["cos"].numpy() - want).max() <= 1e-5
    assert names["pred"][0] == want.argmax()


# --- bad input ----------------------------------------------------------------------------------


def one_line(capsys, prefix: str = "ueo: error: ") -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


def test_an_adapter_that_fails_its_checksum_is_refused(exported, tmp_path, capsys):
    bad = tmp_path / "adapter.safetensors"
    data = bytearray((exported["ueo-tiny-rn"]["run"] / "adapter.safetensors").read_bytes())
    data[-3] ^= 0x40
    bad.write_bytes(bytes(data))
    assert main(["export", "--adapter", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "do not match the checksum" in one_line(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.partial").exists()


def test_out_rules_and_option_values(exported, tmp_path, capsys):
    run = str(exported["ueo-tiny-rn"]["run"])
    earlier = exported["ueo-tiny-rn"]["out"]
    assert main(["export", "--adapter", run, "--out", str(earlier)]) == 2
    assert "exists; give --overwrite" in one_line(capsys)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["export", "--adapter", run, "--out", str(other), "--overwrite"]) == 2
    assert "holds other files" in one_line(capsys)
    assert (other / "notes.txt").read_text() == "keep me"
    assert main(["export", "--adapter", run, "--out", str(tmp_path / "y"), "--precision", "fp64"])
    assert "--precision must be one of fp32, fp16, not 'fp64'" in one_line(capsys)


def test_without_the_deploy_extra_export_says_what_to_install(
    exported, tmp_path, monkeypatch, capsys
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a)
    )
    run = str(exported["ueo-tiny-rn"]["run"])
    assert main(["export", "--adapter", run, "--out", str(tmp_path / "x")]) == 2
    assert "onnx is not installed: pip install 'ueo[deploy]'" in one_line(capsys)


def test_overwrite_replaces_an_export_whole_and_a_failure_keeps_the_earlier(
    exported, tmp_path, monkeypatch, capsys
):
    run = exported["ueo-tiny-rn"]["run"]
    out = tmp_path / "export"
    shutil.copytree(exported["ueo-tiny-rn"]["out"], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(*args):
        raise UeoError("Cannot write open_clip_model.safetensors: No space left on device.")

    monkeypatch.setattr(ueo.export, "_write_open_clip", fail)
    assert main(["export", "--adapter", str(run), "--out", str(out), "--overwrite"]) == 2
    assert "No space left" in one_line(capsys)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (tmp_path / ".export.partial").exists()
    monkeypatch.undo()
    (out / "README.md").write_text("stale")
    assert main(["export", "--adapter", str(run), "--out", str(out), "--overwrite"]) == 0
    assert "threshold" in capsys.readouterr().out
    assert (out / "README.md").read_text() != "stale"
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_the_runners_mistakes_are_one_line(exported, images, tmp_path, capsys):
    prefix = "python -m ueo.deploy: error: "
    out = exported["ueo-tiny-vit"]["out"]
    csv_out = ["--out", str(tmp_path / "p.csv")]
    assert deploy_main([str(out), str(images), *csv_out, "--on-bad-image", "nope"]) == 2
    assert "--on-bad-image must be 'skip' or 'error'" in one_line(capsys, prefix)
    assert deploy_main([str(out), str(images), *csv_out, "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in one_line(capsys, prefix)
    assert deploy_main([str(tmp_path / "none"), str(images), *csv_out]) == 2
    assert "does not exist" in one_line(capsys, prefix)
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    data = bytearray((damaged / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (damaged / "model.onnx").write_bytes(bytes(data))
    assert deploy_main([str(damaged), str(images), *csv_out]) == 2
    assert "does not match its checksum" in one_line(capsys, prefix)
    assert deploy_main([str(out), str(images), *csv_out, "--on-bad-image", "error", "--quiet"]) == 2
    assert "Unreadable image: " in one_line(capsys, prefix)
    assert deploy_main([str(out), str(images), *csv_out, "--device", "tpu"]) == 2
    assert "--device must be one of cpu, cuda, not 'tpu'" in one_line(capsys, prefix)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert deploy_main([str(out), str(images), *csv_out, "--device", "cuda"]) == 2
        assert "needs onnxruntime's CUDAExecutionProvider" in one_line(capsys, prefix)
    assert not (tmp_path / "p.csv").exists()


# --- fp16 ---------------------------------------------------------------------------------------


def test_an_fp16_export_holds_an_fp16_tower_and_runs_here(exported, images, tmp_path):
    """The fp16 graph (for GPU runtimes) of the LayerNorm tower: fp16 weights, its self-check
    on onnxruntime's CPU runtime, and answers near the fp32 graph's."""
    import onnx

    one = exported["ueo-tiny-vit"]
    record = export_adapter(one["run"], tmp_path / "fp16", precision="fp16")
    assert record["precision"] == "fp16" and record["self_check"]["checked"]
    assert record["self_check"]["max_abs_mcm"] <= 1e-3
    graph = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    kinds = {t.data_type for t in graph.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds
    image_set = load_image_set(str(images), CLASSES)
    half = predict_files(load_exported(tmp_path / "fp16", threads=1), image_set)
    full = predict_files(load_exported(one["out"], threads=1), image_set)
    assert np.abs(half.mcm - full.mcm).max() <= 1e-3
    assert (half.pred == full.pred).mean() >= 0.9
