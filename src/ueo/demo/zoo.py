"""ueo's bundled tiny CLIP-style models: their open_clip configs, weights and registration.

No pretrained CLIP weights can be downloaded offline, so ueo ships two tiny open_clip models
(`ueo-tiny-rn`: ModifiedResNet tower with BatchNorm, `ueo-tiny-vit`: ViT tower with LayerNorm)
pretrained on the clean source domain of the offline testbed (`ueo.demo.testbed`, recipe
in `tools/pretrain.py`). They are ordinary open_clip models: configs in `model_configs/`, weights in
`assets/` with a recipe file that records how they were made and the sha256 of the weights.

Checkpoint size: the 49408 x 64 token embedding holds most parameters (RN 67%, ViT 89%), so
it is stored in fp16 (6.3 MB instead of 12.6 MB) and every other tensor in fp32 (BatchNorm
statistics stay exact), keeping each file under 15 MB.
Loading casts everything to fp32; fp16 -> fp32 is exact, so the loaded model is the one whose
zero-shot accuracy the recipe file records.
"""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file

from ueo.clip import register_weights
from ueo.demo import BUNDLED_MODELS
from ueo.errors import UeoError
from ueo.files import atomic_write
from ueo.logs import quiet_root_logger

BUNDLED = BUNDLED_MODELS
WEIGHTS_TAG = "bundled"
FP16_TENSORS = ("token_embedding.weight",)


def _package_dir(name: str) -> Path:
    return Path(str(files("ueo.demo").joinpath(name)))


def register_tiny_models() -> None:
    """Make open_clip know the tiny configs (idempotent: open_clip keeps a global registry)."""
    if not all(name in open_clip.list_models() for name in BUNDLED):
        open_clip.add_model_config(_package_dir("model_configs"))


def register() -> None:
    """The `ueo.models` entry point: the tiny architectures and `--pretrained bundled`."""
    register_tiny_models()
    register_weights(
        WEIGHTS_TAG, load_bundled, lambda name: bundled_recipe(name)["sha256"], models=BUNDLED
    )


def _check_bundled(model_name: str) -> None:
    if model_name not in BUNDLED:
        raise UeoError(
            f"No bundled weights for model '{model_name}'. Bundled models: {', '.join(BUNDLED)}."
        )


def bundled_checkpoint(model_name: str) -> Path:
    """The safetensors file shipped for `model_name`."""
    _check_bundled(model_name)
    return _package_dir("assets") / f"{model_name}.safetensors"


def bundled_recipe(model_name: str) -> dict:
    """The recipe file written next to the checkpoint by tools/pretrain.py."""
    path = bundled_checkpoint(model_name).with_suffix(".json")
    if not path.is_file():
        raise UeoError(
            f"The recipe file {path} of bundled model {model_name} is missing; rebuild it with "
            f"{_rebuild_command(model_name, path)}."
        )
    return json.loads(path.read_text())


def _rebuild_command(model_name: str, path: Path) -> str:
    """The command that writes a bundled model's files where the package reads them."""
    return f"`python tools/pretrain.py --model {model_name} --out {path.parent}`"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def create_tiny_model(model_name: str) -> torch.nn.Module:
    """A randomly initialised tiny model, without open_clip's 'no pretrained weights' warning."""
    register_tiny_models()
    with quiet_root_logger():
        return open_clip.create_model(model_name, pretrained=None)


def load_bundled(model_name: str) -> torch.nn.Module:
    """The bundled model in fp32 and eval mode, after checking its weights against the recipe."""
    path = bundled_checkpoint(model_name)
    if not path.is_file():
        raise UeoError(
            f"The weights {path} of bundled model {model_name} are missing; rebuild them with "
            f"{_rebuild_command(model_name, path)}."
        )
    expected = bundled_recipe(model_name)["sha256"]
    actual = sha256_file(path)
    if actual != expected:
        raise UeoError(
            f"{path} has sha256 {actual} but its recipe file records {expected}: the file is "
            f"corrupt or was replaced. Rebuild it with {_rebuild_command(model_name, path)}."
        )
    return load_weights(model_name, path)


def load_weights(model_name: str, path: Path) -> torch.nn.Module:
    """A tiny model with the weights of `path` (strict, fp32, eval mode); no sha256 check."""
    model = create_tiny_model(model_name)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write the state dict atomically, FP16_TENSORS in fp16 and the rest as is (see above)."""
    state = {
        k: (v.half() if k in FP16_TENSORS else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    with atomic_write(path) as tmp:
        save_file(state, tmp)
