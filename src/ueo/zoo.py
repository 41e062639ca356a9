"""ueo's bundled tiny CLIP-style models, and the zero-shot helpers their recipe and tests share.

No pretrained CLIP weights can be downloaded offline, so ueo ships two tiny open_clip models
(`ueo-tiny-rn`: ModifiedResNet tower with BatchNorm, `ueo-tiny-vit`: ViT tower with LayerNorm)
pretrained on the clean source domain of the offline testbed (`ueo.testbed`, recipe in
`ueo.pretrain`). They are ordinary open_clip models: configs in `model_configs/`, weights in
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
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from ueo.clip import test_transform
from ueo.errors import UeoError
from ueo.io import atomic_write
from ueo.runtime import quiet_root_logger

BUNDLED = ("ueo-tiny-rn", "ueo-tiny-vit")
ZERO_SHOT_TEMPLATE = "a photo of a {}."
FP16_TENSORS = ("token_embedding.weight",)


def _package_dir(name: str) -> Path:
    return Path(str(files("ueo").joinpath(name)))


def register_tiny_models() -> None:
    """Make open_clip know the tiny configs (idempotent: open_clip keeps a global registry)."""
    if not all(name in open_clip.list_models() for name in BUNDLED):
        open_clip.add_model_config(_package_dir("model_configs"))


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
    """The recipe file written next to the checkpoint by `python -m ueo.pretrain`."""
    path = bundled_checkpoint(model_name).with_suffix(".json")
    if not path.is_file():
        raise UeoError(
            f"The recipe file {path} of bundled model {model_name} is missing; rebuild it with "
            f"`python -m ueo.pretrain --model {model_name}`."
        )
    return json.loads(path.read_text())


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
            f"`python -m ueo.pretrain --model {model_name}`."
        )
    expected = bundled_recipe(model_name)["sha256"]
    actual = sha256_file(path)
    if actual != expected:
        raise UeoError(
            f"{path} has sha256 {actual} but its recipe file records {expected}: the file is "
            "corrupt or was replaced. Rebuild it with "
            f"`python -m ueo.pretrain --model {model_name}`."
        )
    return load_checkpoint(model_name, path)


def load_checkpoint(model_name: str, path: Path) -> torch.nn.Module:
    """A tiny model with the weights of `path` (strict, fp32, eval mode); no sha256 check."""
    model = create_tiny_model(model_name)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Write the state dict atomically, FP16_TENSORS in fp16 and the rest as is (see above)."""
    state = {
        k: (v.half() if k in FP16_TENSORS else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    with atomic_write(path) as tmp:
        save_file(state, tmp)


def image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def preprocess(images: np.ndarray | Sequence[Image.Image], size: int) -> torch.Tensor:
    """Model input for a batch of images (uint8 N x H x W grayscale arrays or PIL images).

    The single preprocessing path of pretraining, zero-shot evaluation and tests.
    """
    transform = test_transform(size)
    pils = [Image.fromarray(im) if isinstance(im, np.ndarray) else im for im in images]
    return torch.stack([transform(im.convert("RGB")) for im in pils])


def prompts(class_names: Sequence[str], template: str = ZERO_SHOT_TEMPLATE) -> list[str]:
    """`_` in a class name stands for a space, as in the protocol's class lists."""
    return [template.format(name.replace("_", " ")) for name in class_names]


@torch.no_grad()
def text_features(
    model: torch.nn.Module,
    tokenizer,
    class_names: Sequence[str],
    template: str = ZERO_SHOT_TEMPLATE,
) -> torch.Tensor:
    """L2-normalised text features of one prompt per class."""
    return F.normalize(model.encode_text(tokenizer(prompts(class_names, template))), dim=-1)


@torch.no_grad()
def image_features(
    model: torch.nn.Module, images: np.ndarray | Sequence[Image.Image], batch_size: int = 250
) -> torch.Tensor:
    """L2-normalised image features, computed in batches."""
    size = image_size(model)
    feats = [
        F.normalize(model.encode_image(preprocess(images[i : i + batch_size], size)), dim=-1)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(feats)


def zero_shot_cosines(
    model: torch.nn.Module,
    class_names: Sequence[str],
    images: np.ndarray | Sequence[Image.Image],
    model_name: str,
) -> torch.Tensor:
    """Cosine similarities (images x classes) of the SPEC's zero-shot baseline; model in eval."""
    model.eval()
    text = text_features(model, open_clip.get_tokenizer(model_name), class_names)
    return image_features(model, images) @ text.t()
