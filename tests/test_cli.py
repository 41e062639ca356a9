"""End to end: the `ueo` command in-process (adapt, eval, predict, models, bench), and the
refusals of its mistakes."""

import csv
import json
import logging
import re

import numpy as np
import pytest
import torch
from conftest import CLASSES, UNKNOWN, add_bad_images, draw, load_calibrated, make_folder
from safetensors import safe_open

from ueo.adaptation import adapt
from ueo.api import load_adapted
from ueo.cli import main
from ueo.data import load_image_set
from ueo.metrics import METRIC_NAMES
from ueo.model import CTX_NAME
from ueo.recipe import Recipe, Runtime

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Model .* has RANDOM weights"),
]

TINY = ["--model", "test-tiny-rn", "--pretrained", "none"]
FAST = ["--workers", "0", "--quiet"]
QUIET = Runtime(device="cpu", workers=0, progress=False)


def adapt_argv(data, classes, out, *extra):
    return [
        "adapt",
        *TINY,
        "--data",
        str(data),
        "--classes",
        str(classes),
        "--method",
        "ueo",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--out",
        str(out),
        *FAST,
        *extra,
    ]


def cli(*parts) -> list[str]:
    """argv from words (strings are split at spaces) and paths, with fast runtime options."""
    argv = []
    for part in parts:
        argv += part.split() if isinstance(part, str) else [str(part)]
    return argv + FAST


def read_adapter(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["ueo"])


def test_adapt_eval_predict_round_trip(tmp_path, image_folder, classes_file, calibrated_loads):
    run = tmp_path / "run"
    argv = adapt_argv(image_folder, classes_file, run, "--lr-prompt", "0.01", "--lr-norm", "0.01")
    assert main(argv) == 0

    # The adapter: tuned tensors under their own names, and what is needed to rebuild.
    tensors, meta = read_adapter(run / "adapter.safetensors")
    bn = {k for k in tensors if k != CTX_NAME}
    assert CTX_NAME in tensors and tensors[CTX_NAME].shape == (4, 32)
    # The reference selection: 19 BatchNorms less the 4 projection shortcuts', 2 tensors each.
    assert len(bn) == 30 and all(k.startswith("visual.") for k in bn)
    assert {"visual.bn1.weight", "visual.layer1.0.bn3.bias"} <= bn
    assert not any("downsample" in k for k in bn)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert meta["model"] == "test-tiny-rn" and meta["pretrained"] == "none"
    assert meta["class_names"] == CLASSES
    assert meta["recipe"]["n_ctx"] is None and meta["recipe"]["ctx_init"] == "a photo of a"
    assert meta["ueo_version"] == "0.1.0" and meta["recipe"]["method"] == "ueo"
    assert Recipe.from_dict(meta["recipe"]) == Recipe(
        method="ueo", epochs=2, batch_size=8, lr_prompt=0.01, lr_norm=0.01
    )
    assert 0 < meta["threshold"] < 1

    # Training moved the context away from the embedding of "a photo of a".
    initial = load_calibrated("test-tiny-rn").adapter_state()
    assert not torch.equal(tensors[CTX_NAME], initial[CTX_NAME])
    assert any(not torch.equal(tensors[k], initial[k]) for k in bn)

    # metrics.json
    record = json.loads((run / "metrics.json").read_text())
    for phase in ("zeroshot", "adapted"):
        m = record[phase]["unlabeled"]
        assert set(METRIC_NAMES) <= set(m) and (m["n"], m["n_id"], m["n_ood"]) == (30, 24, 6)
        assert all(0 <= m[k] <= 1 for k in METRIC_NAMES)
    assert record["recipe"] == meta["recipe"]
    assert record["fingerprint"] == Recipe.from_dict(meta["recipe"]).fingerprint()
    assert record["data"] == str(image_folder) and record["test_data"] is None
    assert record["wall_time_s"] > 0 and record["skipped_images"] == 0
    phases = record["timings_s"]  # where the wall time went
    assert set(phases) == {"listing", "model", "zeroshot", "training", "evaluation", "other"}
    assert phases["training"] > 0 and all(v >= 0 for v in phases.values())
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in record["history"])
    assert record["threshold"] == meta["threshold"]
    log = (run / "log.txt").read_text()
    assert "epoch 1/2" in log and "epoch 2/2" in log and "loss" in log

    # Loading the adapter reproduces the adapted tensors exactly.
    model, meta2 = load_adapted(run)
    assert meta2 == meta
    state = model.adapter_state()
    assert set(state) == set(tensors)
    assert all(torch.equal(state[k], tensors[k]) for k in tensors)

    # eval of the adapter on the same images gives the adapted metrics of the run.
    adapter = run / "adapter.safetensors"
    assert (
        main(cli("eval --adapter", adapter, "--data", image_folder, "--out", tmp_path / "e")) == 0
    )
    evaluated = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert evaluated["model"] == "test-tiny-rn"
    for k in METRIC_NAMES:
        assert evaluated["metrics"][k] == pytest.approx(record["adapted"]["unlabeled"][k], abs=1e-6)

    # Zero-shot eval gives the zero-shot metrics of the run.
    argv = cli("eval --zeroshot", *TINY, "--classes", classes_file, "--data", image_folder)
    argv += ["--out", str(tmp_path / "z")]
    assert main(argv) == 0
    zeroshot = json.loads((tmp_path / "z" / "metrics.json").read_text())["metrics"]
    for k in METRIC_NAMES:
        assert zeroshot[k] == pytest.approx(record["zeroshot"]["unlabeled"][k], abs=1e-6)
    assert record["adapted"]["unlabeled"] != record["zeroshot"]["unlabeled"]

    # predict: one row per image.
    preds = tmp_path / "preds.csv"
    argv = ["predict", "--adapter", str(run), "--images", str(image_folder), "--out", str(preds)]
    assert main([*argv, *FAST]) == 0
    with open(preds, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["path", "pred", "prob", "mcm", "is_unknown"]
    images = load_image_set(image_folder, CLASSES)
    assert [r["path"] for r in rows] == images.paths
    assert {r["pred"] for r in rows} <= set(CLASSES)
    mcm = np.array([float(r["mcm"]) for r in rows])
    assert all(0 < float(r["prob"]) <= 1 for r in rows)
    assert ((1 / len(CLASSES) <= mcm) & (mcm < 1)).all()
    assert [r["is_unknown"] for r in rows] == [str(s < meta["threshold"]) for s in mcm]
    assert 0 < sum(r["is_unknown"] == "True" for r in rows) < len(rows)  # Otsu splits them
    # The predictions reproduce the run's accuracy on the ID images.
    id_rows = [(r, lab) for r, lab in zip(rows, images.labels, strict=True) if lab >= 0]
    gacc = np.mean([r["pred"] == CLASSES[lab] for r, lab in id_rows])
    assert gacc == pytest.approx(record["adapted"]["unlabeled"]["gacc"])


def test_adapt_with_random_weights_and_test_set(tmp_path, image_folder, classes_file, capsys):
    """The plain CLI path (uncalibrated random weights), with a labelled test set."""
    test_set = tmp_path / "test"
    make_folder(test_set, per_class=2, seed=3)
    run = tmp_path / "run"
    argv = adapt_argv(image_folder, classes_file, run, "--test-data", str(test_set))
    assert main(argv) == 0
    record = json.loads((run / "metrics.json").read_text())
    assert set(record["zeroshot"]) == set(record["adapted"]) == {"unlabeled", "test"}
    assert record["adapted"]["test"]["n"] == 10 and record["adapted"]["test"]["n_ood"] == 2
    assert record["test_data"] == str(test_set)
    assert "ACC" in capsys.readouterr().out  # the metrics table


def test_adapt_on_loose_unlabeled_images(tmp_path, classes_file, calibrated_loads):
    rng = np.random.default_rng(0)
    loose = tmp_path / "loose"
    loose.mkdir()
    for i, name in enumerate(CLASSES * 2 + UNKNOWN):
        draw(name, rng).save(loose / f"{i}.png")
    run = tmp_path / "run"
    assert main(adapt_argv(loose, classes_file, run, "--epochs", "1")) == 0
    record = json.loads((run / "metrics.json").read_text())
    assert record["zeroshot"]["unlabeled"] is None and record["adapted"]["unlabeled"] is None
    _, meta = read_adapter(run / "adapter.safetensors")
    assert 0 < meta["threshold"] < 1
    assert main(cli("predict --adapter", run, "--images", loose, "--out", tmp_path / "p.csv")) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 9
    # --threshold overrides the stored one: MCM is in (1/K, 1), so 0 flags nothing, 1 all.
    for threshold, unknown in (("0", "False"), ("1", "True")):
        argv = cli("predict --adapter", run, "--images", loose, "--out", tmp_path / "q.csv")
        assert main([*argv, "--threshold", threshold]) == 0
        with open(tmp_path / "q.csv", newline="") as f:
            assert {row["is_unknown"] for row in csv.DictReader(f)} == {unknown}


def test_random_context_round_trip(tmp_path, image_folder, classes_file, calibrated_loads):
    run = tmp_path / "run"
    argv = adapt_argv(image_folder, classes_file, run, "--ctx-init", "", "--n-ctx", "6")
    assert main([*argv, "--epochs", "1", "--method", "infomax"]) == 0
    tensors, meta = read_adapter(run / "adapter.safetensors")
    assert tensors[CTX_NAME].shape == (6, 32)
    assert meta["recipe"]["ctx_init"] == "" and meta["recipe"]["n_ctx"] == 6
    model, _ = load_adapted(run)
    assert torch.equal(model.prompt.ctx.detach(), tensors[CTX_NAME])


def error_of(capsys, argv, only_line: bool = False) -> str:
    """Exit code 2 and one `ueo: error:` line last on stderr, no traceback; returns it.

    Before the error, stderr may hold progress logs and the random-weights warning;
    `only_line` asserts there is nothing else."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert sum("ueo: error:" in ln for ln in lines) == 1
    assert lines[-1].startswith("ueo: error: ")
    if only_line:
        assert len(lines) == 1, err
    return lines[-1]


def test_unknown_model(capsys, tmp_path, image_folder, classes_file):
    argv = adapt_argv(image_folder, classes_file, tmp_path / "r")
    argv[argv.index("test-tiny-rn")] = "no-such-net"
    msg = error_of(capsys, argv)
    assert "Unknown model 'no-such-net'" in msg


def test_unknown_pretrained_tag(capsys, image_folder, classes_file):
    argv = cli("eval --zeroshot --model RN50 --pretrained nonexistent --classes", classes_file)
    msg = error_of(capsys, argv + cli("--data", image_folder))
    assert "nonexistent" in msg and "RN50" in msg and "openai" in msg  # lists the real tags


def test_missing_weights_offline(capsys, monkeypatch, tmp_path, image_folder, classes_file):
    import huggingface_hub.constants as hf

    empty = tmp_path / "empty_cache"
    empty.mkdir()
    for var in ("HF_HOME", "XDG_CACHE_HOME", "HF_HUB_CACHE", "TORCH_HOME"):
        monkeypatch.setenv(var, str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once, at import.
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(empty / "hub"))
    # No logging handler on the root logger, as in a plain `ueo` process: library log
    # records must not reach stderr.
    monkeypatch.setattr(logging.root, "handlers", [])
    argv = cli("eval --zeroshot --model RN50 --pretrained openai --classes", classes_file)
    msg = error_of(capsys, argv + cli("--data", image_folder), only_line=True)
    assert "RN50" in msg and "'openai'" in msg
    # Where a local file goes, with the architecture OpenAI's weights need (QuickGELU): the
    # combination ueo itself does not warn about.
    assert "--model RN50-quickgelu --pretrained /path/to/RN50-openai.safetensors" in msg
    assert not logging.root.handlers


def test_missing_weights_without_network_fails_fast(
    capsys, monkeypatch, tmp_path, image_folder, classes_file
):
    """Not offline by setting, but the hub is unreachable: one error, no minute of retries."""
    import huggingface_hub.constants as hf

    empty = tmp_path / "empty_cache"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(empty / "hub"))
    monkeypatch.setattr(hf, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    argv = cli("eval --zeroshot --model RN50 --pretrained openai --classes", classes_file)
    msg = error_of(capsys, argv + cli("--data", image_folder), only_line=True)
    # The connection probe answered, not the hub client after its retries.
    assert "cannot be reached" in msg and "RN50" in msg
    assert hf.HF_HUB_OFFLINE is False  # restored


@pytest.mark.parametrize(
    ("classes", "expected"),
    [
        ("\n  \n", r"No class names in .*classes\.txt"),
        ("Red_Square\nblue\nred square\n", "Duplicated class name 'red square'"),
        (
            "red square\n" + " ".join(["very"] * 20) + " long\n",
            "too long for the text context of 24",
        ),
    ],
)
def test_bad_class_lists(capsys, tmp_path, image_folder, classes, expected):
    path = tmp_path / "classes.txt"
    path.write_text(classes)
    msg = error_of(capsys, adapt_argv(image_folder, path, tmp_path / "run"))
    assert re.search(expected, msg), msg


def test_bad_data(capsys, tmp_path, classes_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No images found" in error_of(capsys, adapt_argv(empty, classes_file, tmp_path / "r"))

    (tmp_path / "a.png").write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 0\nb.png\n")
    msg = error_of(capsys, adapt_argv(listing, classes_file, tmp_path / "r"))
    assert f"{listing}:2" in msg

    listing.write_text("a.png 0\nmissing/b.png 1\n")
    msg = error_of(capsys, adapt_argv(listing, classes_file, tmp_path / "r"))
    assert "do not exist" in msg and "missing/b.png" in msg

    msg = error_of(capsys, adapt_argv(tmp_path / "nowhere", classes_file, tmp_path / "r"))
    assert "does not exist" in msg


def test_bad_options(capsys, tmp_path, image_folder, classes_file):
    msg = error_of(capsys, adapt_argv(image_folder, classes_file, tmp_path / "r", "--n-ctx", "8"))
    assert "--n-ctx" in msg
    argv = adapt_argv(image_folder, classes_file, tmp_path / "r", "--ctx-init", "")
    assert "--n-ctx" in error_of(capsys, argv)
    argv = adapt_argv(image_folder, classes_file, tmp_path / "r", "--precision", "fp16")
    assert "needs a CUDA GPU" in error_of(capsys, [*argv, "--device", "cpu"])
    msg = error_of(capsys, cli("eval --data", image_folder))
    assert "--adapter or --zeroshot" in msg
    msg = error_of(capsys, cli("eval --zeroshot --model RN50 --data", image_folder))
    assert "needs --model and --classes (--pretrained: default openai)" in msg
    argv = cli("predict --adapter", tmp_path / "no.safetensors", "--images", image_folder)
    msg = error_of(capsys, argv + cli("--out", tmp_path / "p.csv"))
    assert f"Adapter file {tmp_path / 'no.safetensors'} does not exist" in msg
    not_adapter = tmp_path / "x.safetensors"
    not_adapter.write_text("garbage")
    msg = error_of(capsys, cli("eval --adapter", not_adapter, "--data", image_folder))
    assert "not a readable safetensors adapter" in msg


def test_oracle_and_eval_need_labels_in_cli(capsys, tmp_path, classes_file):
    loose = tmp_path / "loose"
    loose.mkdir()
    draw("red square", np.random.default_rng(0)).save(loose / "a.png")
    argv = adapt_argv(loose, classes_file, tmp_path / "r", "--method", "ueo-oracle")
    assert "labels" in error_of(capsys, argv)
    argv = ["eval", "--zeroshot", *TINY, "--classes", str(classes_file), "--data", str(loose)]
    assert "no labels" in error_of(capsys, [*argv, *FAST])


def test_unreadable_images_are_skipped(tmp_path, image_folder, classes_file, capsys):
    add_bad_images(image_folder)
    run = tmp_path / "run"
    assert main(adapt_argv(image_folder, classes_file, run, "--epochs", "1")) == 0
    record = json.loads((run / "metrics.json").read_text())
    assert record["skipped_images"] == 2
    assert record["adapted"]["unlabeled"]["n"] == 30  # the 30 readable ones
    err = capsys.readouterr().err
    assert "truncated.png" in err and "text.jpg" in err
    log = (run / "log.txt").read_text()
    assert log.count("Skipping unreadable image") == 2

    assert main(cli("eval --adapter", run, "--data", image_folder, "--out", tmp_path / "e")) == 0
    assert (
        json.loads((tmp_path / "e" / "metrics.json").read_text())["metrics"]["skipped_images"] == 2
    )
    argv = cli("predict --adapter", run, "--images", image_folder, "--out", tmp_path / "p.csv")
    assert main(argv) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 30
    assert "2 unreadable image(s) skipped" in capsys.readouterr().err

    argv = adapt_argv(image_folder, classes_file, tmp_path / "r2", "--on-bad-image", "error")
    msg = error_of(capsys, argv)
    assert "Unreadable image" in msg and ("truncated.png" in msg or "text.jpg" in msg)


def test_bad_images_in_unlabeled_and_test_sets_are_all_counted(tmp_path):
    """Two different unreadable files that sit at the same index of the two sets."""
    unlabeled, test = tmp_path / "u", tmp_path / "t"
    make_folder(unlabeled, per_class=2, classes=CLASSES)
    make_folder(test, per_class=2, classes=CLASSES, seed=1)
    for folder in (unlabeled, test):
        (folder / "blue_stripes" / "000.png").write_text("broken")
    u, t = load_image_set(unlabeled, CLASSES), load_image_set(test, CLASSES)
    assert u.paths.index(str(unlabeled / "blue_stripes" / "000.png")) == t.paths.index(
        str(test / "blue_stripes" / "000.png")
    )
    model = load_calibrated("test-tiny-rn")
    result = adapt(model, u, Recipe(epochs=1, batch_size=4), QUIET, test=t)
    assert result.skipped_images == 2
    assert result.metrics["adapted"]["unlabeled"]["n"] == 7
    assert result.metrics["adapted"]["test"]["n"] == 7


def test_models_command(capsys):
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert {"test-tiny-rn", "test-tiny-vit", "RN50"} <= set(names)


def test_models_tags_name_the_bundled_weights(capsys):
    """`--pretrained bundled` works for the tiny models, so `--tags` lists it beside them."""
    assert main(["models", "--tags"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = dict(line.split("  ", 1) for line in out if "  " in line)
    assert lines["ueo-tiny-rn"] == lines["ueo-tiny-vit"] == "[bundled]"
    assert "openai" in lines["RN50"] and "bundled" not in lines["RN50"]


def test_offline_file_advice_names_the_quickgelu_architecture():
    from ueo.clip import file_model_name

    assert file_model_name("RN50", "openai") == "RN50-quickgelu"
    assert file_model_name("ViT-B-16", "openai") == "ViT-B-16-quickgelu"
    assert file_model_name("RN50-quickgelu", "openai") == "RN50-quickgelu"
    assert file_model_name("ViT-B-16", "laion2b_s34b_b88k") == "ViT-B-16"  # GELU weights


# --- one vocabulary (docs/cli.md): --data everywhere, the old spellings kept ---------------------


def test_predict_reads_data_and_its_former_name_images(
    tmp_path, image_folder, classes_file, capsys, calibrated_loads
):
    run = tmp_path / "run"
    assert main(adapt_argv(image_folder, classes_file, run, "--epochs", "0")) == 0
    for flag in ("--data", "--images"):
        out = tmp_path / f"{flag[2:]}.csv"
        assert main(cli("predict --adapter", run, flag, image_folder, "--out", out)) == 0
    assert (tmp_path / "data.csv").read_text() == (tmp_path / "images.csv").read_text()
    capsys.readouterr()
    for command in ("adapt", "eval", "predict"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--data DATA, --images DATA" in capsys.readouterr().out


def test_eval_help_tells_where_the_base_weights_come_from(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "with --zeroshot:" in text and "(default openai)" in text
    assert "with --adapter:" in text and "(default: the adapter's)" in text


def test_prepare_and_protocol_take_the_dataset_as_an_option(capsys):
    assert main(["protocol", "officehome", "--scenario", "OPDA"]) == 0
    positional = capsys.readouterr().out
    assert main(["protocol", "--dataset", "OfficeHome", "--scenario", "OPDA"]) == 0
    assert capsys.readouterr().out == positional and "50-59" in positional
    assert main(["protocol", "office31", "--dataset", "office-31", "--scenario", "ODA"]) == 0
    capsys.readouterr()
    msg = error_of(capsys, ["protocol", "office31", "--dataset", "visda", "--scenario", "ODA"])
    assert "Two datasets" in msg
    assert "--dataset NAME" in error_of(capsys, ["protocol", "--scenario", "ODA"])


def test_bench_all_classes_and_its_deprecated_name(tmp_path, image_folder, capsys):
    every = tmp_path / "all.txt"
    every.write_text("\n".join(CLASSES + UNKNOWN) + "\n")
    common = ["bench", "--data", image_folder, "--known", "2", "--model", "test-tiny-rn"]
    common += ["--pretrained", "none", "--methods", "zeroshot", "--dry-run", "--quiet"]
    argv = [str(a) for a in common + ["--out", tmp_path / "b"]]
    assert main(argv + ["--all-classes", str(every)]) == 0
    new = capsys.readouterr()
    assert "warning" not in new.err and "0/4 cells complete" in new.out
    assert main(argv + ["--classes", str(every)]) == 0
    old = capsys.readouterr()
    assert old.out == new.out
    warnings = [line for line in old.err.splitlines() if "warning" in line]
    assert warnings == [
        "ueo: warning: bench --classes is deprecated: it names all classes in label order, "
        "now --all-classes."
    ]
    msg = error_of(capsys, argv + ["--classes", str(every), "--all-classes", str(every)])
    assert "former name of --all-classes" in msg
