"""`ueo export`: an adapted model out of ueo, as one ONNX graph and as plain open_clip weights.

An adapter holds only what UEO tuned (the prompt context and the image tower's norm affines)
and only ueo can use it. The export writes the adapted model in two forms that need no ueo:

- `model.onnx`: uint8 pixels in (the image after the test transform's resize and centre crop,
  before ToTensor), `ueo predict`'s answers out (`ueo.deploy.OUTPUTS`). The adapted prompts'
  text features are a constant of the graph (a prompt never changes after adaptation, so its
  text tower is not needed), and so is the threshold. Class names, threshold, input size,
  mean/std and the resize rule are in its metadata. `ueo.deploy` runs it without torch.
- `open_clip/`: the whole open_clip state dict with the adapted affines in place, the
  model's config (for `open_clip.add_model_config`, and as open_clip's `local-dir:` folder),
  and the text features as a fixed linear head (`head.safetensors`), which is how a learned
  prompt is used in practice (open_clip's `build_zero_shot_classifier`).

The graph is traced with torch's TorchScript exporter (`dynamo=False`, opset `OPSET`):
it exports open_clip's towers in seconds as one file, needs no onnxscript, and its graph
agrees with torch to float rounding (docs/export.md has the figures). Before the folder is
published, onnxruntime runs the graph on random pixels and its answers are compared with
ueo's own forward pass (`SELF_CHECK`); a graph that disagrees is not published.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ueo import __version__
from ueo.api import load_adapted
from ueo.cache import split_transform
from ueo.deploy import (
    CLASSES_FILE,
    EXPORT_FILE,
    FORMAT,
    FORMAT_VERSION,
    HEAD_FILE,
    HEAD_TENSOR,
    INPUT,
    LOCAL_DIR_CONFIG,
    MODEL_FILE,
    OPEN_CLIP_DIR,
    OUTPUTS,
    PRECISIONS,
    README_FILE,
    RESIZE_RULE,
    WEIGHTS_FILE,
    check_export_dir,
    file_sha256,
    needs_onnx,
    session_options,
)
from ueo.errors import UeoError
from ueo.files import atomic_write, write_json, write_text
from ueo.fingerprint import weights_identity
from ueo.layout import ADAPTER_FILE, METRICS_FILE
from ueo.model import UeoModel
from ueo.objectives import LOGIT_SCALE, mcm_score
from ueo.provenance import environment
from ueo.runs import publish, staging_dir

log = logging.getLogger("ueo")

OPSET = 17  # LayerNormalization is one op from 17 on; every runtime of the last years has it
MCM_TEMPERATURE = 1.0  # docs/spec.md: MCM is the softmax of the raw cosines
TRACE_BATCH = 2  # the batch traced; the batch axis is dynamic
SELF_CHECK_IMAGES = 5  # another batch size than the traced one: the axis must really be dynamic
SELF_CHECK_SEED = 0
# How far the graph's (probabilities, MCM) may lie from ueo's fp32 forward pass on the
# self-check: float rounding for fp32; fp16's rounding of the tower for fp16.
SELF_CHECK = {"fp32": (1e-4, 1e-5), "fp16": (1e-1, 1e-3)}


class DeployGraph(nn.Module):
    """uint8 pixels to `ueo predict`'s answers, every step as ueo takes it.

    ToTensor's `/ 255` and Normalize's `(x - mean) / std` as in `ueo.cache.Split.finish`; the
    image features L2-normalised in fp32 (`UeoModel.image_features`); cosines with the fixed
    text features; `probs` the softmax of 100 x cos; `mcm` the softmax of the cosines (T = 1),
    its maximum; `pred` the argmax of the cosines; `is_unknown` the MCM in float64 below the
    threshold (a Python float), as `ueo.predictions.Predictions` compares them. With an fp16
    tower only the tower runs in fp16: the features, cosines and answers stay fp32.
    """

    def __init__(
        self,
        net: nn.Module,
        text: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        threshold: float,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.net = net
        self.dtype = dtype
        self.register_buffer("text", text.float())
        self.register_buffer("scale", torch.tensor(255.0))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("threshold", torch.tensor(threshold, dtype=torch.float64))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (pixels.float() / self.scale - self.mean) / self.std
        features = F.normalize(self.net.encode_image(x.to(self.dtype)).float(), dim=-1)
        cos = features @ self.text.t()
        probs = torch.softmax(LOGIT_SCALE * cos, dim=-1)
        mcm = torch.softmax(cos / MCM_TEMPERATURE, dim=-1).amax(dim=-1)
        pred = cos.argmax(dim=-1)
        return probs, mcm, pred, mcm.double() < self.threshold


def export_adapter(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    precision: str = "fp32",
    pretrained: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the export folder of an adapted model; returns export.json's record.

    Args:
        adapter: an adapter file or its run folder (its checksum is checked).
        out: the folder to write: new, or an earlier export with `overwrite`. It is written
            into a staging folder beside it and swapped in whole.
        precision: `fp32`, or `fp16` (the image tower in fp16, for GPU runtimes; the
            open_clip weights stay fp32).
        pretrained: base weights instead of those the adapter names (a local file, say).
        overwrite: replace an earlier export in `out`.

    Returns:
        The content of export.json: threshold, logit scale, MCM temperature, the source run's
        identity, the self-check's figures and every file's sha256.
    """
    if precision not in PRECISIONS:
        raise UeoError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
    needs_onnx("onnx", "onnxruntime")
    out = check_export_dir(out, overwrite)
    model, meta = load_adapted(adapter, "cpu", pretrained, channels_last=False)  # checksum checked
    if meta["recipe"]["precision"] != "fp32":
        log.warning(
            "The adapter's recipe runs `ueo predict` under %s autocast; the export computes "
            "in %s, so its answers differ from ueo predict's by that rounding.",
            meta["recipe"]["precision"],
            precision,
        )
    staging = staging_dir(out)
    if staging.exists():
        shutil.rmtree(staging)
    (staging / OPEN_CLIP_DIR).mkdir(parents=True)
    try:
        record = _write_export(staging, model, meta, adapter, precision, pretrained)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, out)
    return record


def _write_export(
    staging: Path, model: UeoModel, meta: dict, adapter, precision: str, pretrained: str | None
) -> dict:
    """Every file of the export into `staging`; returns export.json's record."""
    with torch.no_grad():
        text = model.text_features().float()
    clip = model.clip
    graph = DeployGraph(
        model.net if precision == "fp32" else _half_copy(model.net),
        text,
        clip.mean,
        clip.std,
        float(meta["threshold"]),
        torch.float32 if precision == "fp32" else torch.float16,
    ).eval()
    model_meta = _model_metadata(meta, clip, precision)
    _export_graph(graph, staging / MODEL_FILE, clip.image_size, model_meta)
    check = _self_check(model, staging / MODEL_FILE, precision)
    _write_open_clip(staging / OPEN_CLIP_DIR, model, text, clip)
    write_text(staging / CLASSES_FILE, "".join(f"{name}\n" for name in meta["class_names"]))
    write_text(staging / README_FILE, _readme(meta, clip, precision))
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": clip.model_name,
        "class_names": meta["class_names"],
        "threshold": float(meta["threshold"]),
        "threshold_rule": meta.get("threshold_rule"),
        "logit_scale": LOGIT_SCALE,
        "mcm_temperature": MCM_TEMPERATURE,
        "precision": precision,
        "opset": OPSET,
        "input": _input_record(clip),
        "source": _source_identity(adapter, meta, clip, pretrained),
        "self_check": check,
        "environment": {**environment("cpu", precision), **_onnx_versions()},
        "files": _checksums(staging),
    }
    write_json(staging / EXPORT_FILE, record)
    return record


# --- the graph ---------------------------------------------------------------------------------


def _half_copy(net: nn.Module) -> nn.Module:
    """The network with its image tower in fp16 (a copy: the fp32 one is still exported as
    open_clip weights and checked against)."""
    half = copy.deepcopy(net)
    half.visual.half()
    return half


@contextmanager
def _tracing():
    """What the TorchScript exporter needs: nn.MultiheadAttention's fused fast path off (it
    has no ONNX form) and its warnings (legacy exporter, traced shapes) kept to itself."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _export_graph(graph: DeployGraph, path: Path, size: int, metadata: dict) -> None:
    """Trace the graph into `path` (dynamic batch), then write the metadata into it."""
    import onnx

    probe = torch.zeros((TRACE_BATCH, 3, size, size), dtype=torch.uint8)
    batch = {0: "batch"}
    with _tracing():
        torch.onnx.export(
            graph,
            (probe,),
            str(path),
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_axes={name: batch for name in (INPUT, *OUTPUTS)},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    proto.producer_name, proto.producer_version = "ueo", __version__
    onnx.checker.check_model(proto)
    with atomic_write(path) as tmp:
        onnx.save(proto, str(tmp))


def _model_metadata(meta: dict, clip, precision: str) -> dict:
    """The graph's metadata_props (each value JSON text): what a runtime needs to feed it and
    read its answers."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ueo_version": __version__,
        "model": clip.model_name,
        "class_names": list(meta["class_names"]),
        "threshold": float(meta["threshold"]),
        "input_size": int(clip.image_size),
        "mean": list(clip.mean),
        "std": list(clip.std),
        "interpolation": "bicubic",
        "resize": RESIZE_RULE,
        "logit_scale": LOGIT_SCALE,
        "mcm_temperature": MCM_TEMPERATURE,
        "precision": precision,
        "outputs": {
            "probs": "N x K float32: softmax of logit_scale x cos",
            "mcm": "N float32: max softmax of cos / mcm_temperature",
            "pred": "N int64: argmax of cos, an index into class_names",
            "is_unknown": "N bool: mcm (as float64) < threshold",
        },
    }


def _self_check(model: UeoModel, path: Path, precision: str) -> dict:
    """onnxruntime's answers against ueo's own forward pass (`UeoModel.cosines` in fp32 on the
    test transform's finished pixels) on random pixels, a batch the trace did not see.

    A graph that differs by more than `SELF_CHECK`'s bounds for its precision is refused. An
    fp16 graph is compared with the fp32 model; a runtime here that cannot run it (no fp16
    kernel for one of its operators) leaves it unchecked, saying so.
    """
    import onnxruntime as ort

    size = model.clip.image_size
    rng = np.random.default_rng(SELF_CHECK_SEED)
    pixels = rng.integers(0, 256, (SELF_CHECK_IMAGES, 3, size, size), dtype=np.uint8)
    try:
        options = session_options(precision, "cpu")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = dict(zip(OUTPUTS, session.run(list(OUTPUTS), {INPUT: pixels}), strict=True))
    except Exception as exc:  # onnxruntime's own error types
        if precision == "fp32":
            raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else repr(exc)
        return {"checked": False, "why": f"onnxruntime's CPU runtime cannot run it: {first}"}
    finish = split_transform(model.clip.test_transform())
    with torch.no_grad():
        cos = model.cosines(finish.finish(torch.from_numpy(pixels)))[0]
    probs_bound, mcm_bound = SELF_CHECK[precision]
    probs = float(np.abs(got["probs"] - torch.softmax(LOGIT_SCALE * cos, -1).numpy()).max())
    mcm = float(np.abs(got["mcm"] - mcm_score(cos).numpy()).max())
    if not (probs <= probs_bound and mcm <= mcm_bound):
        raise UeoError(
            f"The exported graph disagrees with ueo's forward pass on random pixels "
            f"(probabilities by {probs:.2g}, MCM by {mcm:.2g}); nothing was written."
        )
    return {
        "checked": True,
        "against": "ueo's fp32 forward pass (UeoModel.cosines), onnxruntime CPU",
        "images": SELF_CHECK_IMAGES,
        "max_abs_probs": probs,
        "max_abs_mcm": mcm,
        "pred_equal": bool((got["pred"] == cos.argmax(-1).numpy()).all()),
    }


# --- the open_clip form ------------------------------------------------------------------------


def open_clip_config(net: nn.Module, name: str) -> dict:
    """The open_clip config that builds `net`: its registered one (ueo's bundled configs
    included), with `quick_gelu` set when the network was built with QuickGELU (OpenAI's
    weights by tag: ueo forces it, and a plain config would build GELU)."""
    config = open_clip.get_model_config(name)
    if config is None:
        raise UeoError(f"open_clip has no config for model {name}; it cannot be exported.")
    quick = any(isinstance(m, open_clip.transformer.QuickGELU) for m in net.modules())
    if quick:
        config["quick_gelu"] = True
    return config


def _write_open_clip(folder: Path, model: UeoModel, text: torch.Tensor, clip) -> None:
    """The state dict, its config (by name and as `local-dir:`) and the head."""
    config = open_clip_config(model.net, clip.model_name)
    state = {k: v.detach().float().contiguous() for k, v in model.net.state_dict().items()}
    with atomic_write(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(folder / f"{clip.model_name}.json", config)
    preprocess = {
        "size": clip.image_size,
        "mean": list(clip.mean),
        "std": list(clip.std),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    write_json(folder / LOCAL_DIR_CONFIG, {"model_cfg": config, "preprocess_cfg": preprocess})
    names = json.dumps(model.class_names)
    with atomic_write(folder / HEAD_FILE) as tmp:
        save_file({HEAD_TENSOR: text.contiguous()}, str(tmp), metadata={"class_names": names})


# --- the record --------------------------------------------------------------------------------


def _input_record(clip) -> dict:
    return {
        "name": INPUT,
        "layout": "N x 3 x H x W, uint8, RGB",
        "size": int(clip.image_size),
        "resize": RESIZE_RULE,
        "mean": list(clip.mean),
        "std": list(clip.std),
    }


def _source_identity(adapter, meta: dict, clip, pretrained: str | None) -> dict:
    """What the export was made from: the adapter file (its bytes and its tensors' sha256),
    the base weights, the recipe, and the run's fingerprint and identity when its
    metrics.json is beside the adapter."""
    path = Path(adapter)
    path = path / ADAPTER_FILE if path.is_dir() else path
    source = {
        "adapter": str(path.resolve()),
        "adapter_sha256": file_sha256(path),
        "tensors_sha256": meta["tensors_sha256"],
        "ueo_version": meta["ueo_version"],
        "model": meta["model"],
        "pretrained": clip.pretrained,
        "pretrained_override": pretrained is not None,
        "weights": weights_identity(clip.model_name, clip.pretrained),
        "recipe": meta["recipe"],
    }
    metrics = path.parent / METRICS_FILE
    if metrics.is_file():
        try:
            record = json.loads(metrics.read_text(encoding="utf-8"))
        except ValueError:
            record = {}
        for key in ("fingerprint", "identity"):
            if key in record:
                source[f"run_{key}"] = record[key]
    return source


def _onnx_versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by its path relative to it (with `/`)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}


def _readme(meta: dict, clip, precision: str) -> str:
    """The export's README: each form used in about five lines."""
    name, size = clip.model_name, clip.image_size
    k = len(meta["class_names"])
    cuda = "  # fp16: --device cuda (onnxruntime-gpu)\n" if precision == "fp16" else ""
    return f"""# {name}, adapted by ueo: {k} classes, exported ({precision})

The answers of `ueo predict` for these {k} classes (`{CLASSES_FILE}`), outside ueo.
`{EXPORT_FILE}` holds the threshold ({meta["threshold"]:.6g}), the source run and every
file's sha256. ueo's docs/export.md says what each form needs and how exactly it agrees.

## 1. The runner: numpy, Pillow, onnxruntime (no torch)
```sh
pip install --no-deps ueo && pip install numpy pillow tqdm onnxruntime
python -m ueo.deploy . IMAGES --out predictions.csv  # a folder, a list, - or one image
{cuda}```

## 2. `{MODEL_FILE}` in any ONNX runtime
```python
import json, onnxruntime                         # pixels: N x 3 x {size} x {size} uint8 RGB,
s = onnxruntime.InferenceSession("{MODEL_FILE}")  # shorter side resized to {size} (bicubic),
probs, mcm, pred, is_unknown = s.run(None, {{"{INPUT}": pixels}})  # then a centre crop
meta = {{k: json.loads(v) for k, v in s.get_modelmeta().custom_metadata_map.items()}}
names = meta["class_names"]  # also threshold, input_size, mean, std, resize, ...
```

## 3. Plain open_clip (torch, open_clip; no ueo)
```python
import open_clip, torch, safetensors.torch as st
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{OPEN_CLIP_DIR}")
model.eval()  # BatchNorm's running statistics, as ueo's frozen model uses them
head = st.load_file("{OPEN_CLIP_DIR}/{HEAD_FILE}")["{HEAD_TENSOR}"]  # K x D, L2-normalised
cos = torch.nn.functional.normalize(model.encode_image(preprocess(img)[None]), dim=-1) @ head.T
# or: open_clip.add_model_config("{OPEN_CLIP_DIR}/{name}.json"), then create_model_and_transforms(
#     "{name}", pretrained="{OPEN_CLIP_DIR}/{WEIGHTS_FILE}")
```
"""
