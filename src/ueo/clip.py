"""Load a CLIP-style model from open_clip's zoo, a local file or a registered weight source.

One loader for every source means the demo exercises the same path as real CLIP weights.
Other packages add architectures and weight tags through the `ueo.models` entry-point group:
each entry is a function that calls `register_weights` (and `open_clip.add_model_config`);
ueo's own demo registers its bundled tiny models (`--pretrained bundled`) that way.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision import transforms as T

from ueo.errors import UeoError
from ueo.logs import quiet_root_logger

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "none"
PLUGIN_GROUP = "ueo.models"
WEIGHT_SOURCES: dict[str, Callable[[str], torch.nn.Module]] = {}
WEIGHT_IDENTITIES: dict[str, Callable[[str], str]] = {}
WEIGHT_MODELS: dict[str, tuple[str, ...]] = {}


def register_weights(
    tag: str,
    loader: Callable[[str], torch.nn.Module],
    identity: Callable[[str], str] | None = None,
    models: Iterable[str] = (),
) -> None:
    """Make `--pretrained tag` call `loader(model_name)`, which returns the network.

    `identity(model_name)` names the exact weights (a sha256, say): run fingerprints use it
    to tell a result made with other weights under the same tag. `models` are the
    architectures the source has weights for: `ueo models --tags` lists the tag beside them.
    """
    WEIGHT_SOURCES[tag] = loader
    WEIGHT_MODELS[tag] = tuple(models)
    if identity is not None:
        WEIGHT_IDENTITIES[tag] = identity


@cache
def load_plugins() -> None:
    """Run every `ueo.models` entry point once (they register architectures and weights)."""
    for entry in entry_points(group=PLUGIN_GROUP):
        entry.load()()


@dataclass
class LoadedClip:
    """A frozen open_clip model with what is needed to feed it images and text."""

    model: torch.nn.Module
    tokenizer: object
    model_name: str
    pretrained: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels_last: bool = False

    def test_transform(self) -> T.Compose:
        return test_transform(self.image_size, self.mean, self.std)

    def train_transform(self) -> T.Compose:
        return train_transform(self.image_size, self.mean, self.std)


def test_transform(size: int, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD) -> T.Compose:
    """Resize + centre crop (bicubic), docs/spec.md's test transform: MCM weights, evaluation."""
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def train_transform(size: int, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD) -> T.Compose:
    """RandomResizedCrop(scale 0.5-1, bicubic) + horizontal flip, as the reference recipe."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def list_models(tags: bool = False) -> list[tuple[str, list[str]]]:
    """Every architecture open_clip knows (registered plugins included), with its weight tags:
    open_clip's published ones and those of registered weight sources (`bundled`)."""
    load_plugins()

    def tags_of(name: str) -> list[str]:
        plugins = [tag for tag, models in WEIGHT_MODELS.items() if name in models]
        return open_clip.list_pretrained_tags_by_model(name) + plugins

    return [(name, tags_of(name) if tags else []) for name in open_clip.list_models()]


def canonical_model_name(name: str) -> str:
    """Accept OpenAI spellings (`ViT-B/16`) for open_clip names (`ViT-B-16`)."""
    load_plugins()
    known = open_clip.list_models()
    candidates = [name, name.replace("/", "-")]
    for candidate in candidates:
        if candidate in known:
            return candidate
    lowered = {m.lower(): m for m in known}
    for candidate in candidates:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    close = [m for m in known if name.replace("/", "-").split("-")[0].lower() in m.lower()][:12]
    hint = f" Similar: {', '.join(close)}." if close else ""
    raise UeoError(f"Unknown model '{name}'.{hint} `ueo models` lists every architecture.")


def load_clip(
    model: str,
    pretrained: str = "openai",
    device: str | torch.device = "cpu",
    channels_last: bool = True,
) -> LoadedClip:
    """Create the model named `model` with weights `pretrained`, frozen and in eval mode.

    `pretrained` is an open_clip tag (`openai`, `laion2b_s34b_b79k`, ...), a local checkpoint
    file, a registered source (`bundled` for ueo's tiny models), or `none` for random weights
    (tests only). `channels_last` stores BatchNorm (ResNet) towers in NHWC, faster on CPUs
    and GPUs; it is chosen here, once, so that nothing later changes a shared network.
    """
    name = canonical_model_name(model)
    if pretrained in WEIGHT_SOURCES:
        net = WEIGHT_SOURCES[pretrained](name)
    elif pretrained.lower() == RANDOM_WEIGHTS:
        warnings.warn(
            f"Model {name} has RANDOM weights (--pretrained none): results are meaningless "
            "except for testing.",
            stacklevel=2,
        )
        log.warning("Using RANDOM weights for %s (--pretrained none)", name)
        with quiet_root_logger():
            net = open_clip.create_model(name, pretrained=None)
    elif os.path.isfile(pretrained):
        net = _create_from_file(name, pretrained)
    else:
        net = _create_from_tag(name, pretrained)
    return _wrap(net, name, pretrained, device, channels_last)


def _create_from_file(name: str, path: str) -> torch.nn.Module:
    if open_clip.get_pretrained_cfg(name, "openai").get("quick_gelu") and "quickgelu" not in name:
        log.warning(
            "%s is built with GELU; if %s holds OpenAI's weights, use --model %s-quickgelu "
            "(OpenAI's CLIPs were trained with QuickGELU).",
            name,
            path,
            name,
        )
    try:
        with warnings.catch_warnings():  # PyTorch's notes on the pickle protocol of a .pt file
            warnings.filterwarnings("ignore", module=r"torch\._weights_only_unpickler")
            return open_clip.create_model(name, pretrained=path)
    except pickle.UnpicklingError:
        # PyTorch's own message suggests weights_only=False, which would run the file's code.
        raise UeoError(
            f"Checkpoint file {path} is not plain tensors: it holds other pickled Python "
            "objects, or is damaged. ueo never unpickles a file (that can run code); give an "
            "open_clip state dict as .safetensors, or a .pt/.bin of plain tensors."
        ) from None
    except Exception as exc:  # open_clip raises many types for a bad file
        raise UeoError(
            f"Could not load checkpoint file {path} into model {name}: {_first_line(exc)}. The "
            "file must be an open_clip state dict (.safetensors, or .pt/.bin loadable with "
            "weights_only=True) for this architecture."
        ) from exc


def check_model(model: str, pretrained: str) -> str:
    """The canonical name of `model`, once it and its weights `pretrained` are known to exist
    (a registered source, `none`, a file or a published tag); nothing is loaded or downloaded,
    so a misspelt name is reported before any data is read."""
    name = canonical_model_name(model)
    if not (
        pretrained in WEIGHT_SOURCES
        or pretrained.lower() == RANDOM_WEIGHTS
        or os.path.isfile(pretrained)
    ):
        _check_tag(name, pretrained)
    return name


def _check_tag(name: str, tag: str) -> None:
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        available = ", ".join(tags) if tags else "none published"
        raise UeoError(
            f"Unknown pretrained tag '{tag}' for model {name} (and no such file). "
            f"Tags for {name}: {available}. Or pass a local checkpoint file, "
            f"{', '.join(f'`{t}`' for t in WEIGHT_SOURCES)} or `none`."
        )


def _create_from_tag(name: str, tag: str) -> torch.nn.Module:
    _check_tag(name, tag)
    try:
        with quiet_root_logger():  # our one-line error says what open_clip's log would
            return _create_cached_or_download(name, tag)
    except Exception as exc:  # download failures surface as RuntimeError, OSError, HTTP errors
        raise UeoError(
            f"Could not obtain weights for model {name}, tag '{tag}': {_first_line(exc)}. "
            "They are downloaded from the Hugging Face hub on first use and cached under "
            "~/.cache/huggingface. Offline, download them on a connected machine and pass the "
            f"file instead: --model {file_model_name(name, tag)} "
            f"--pretrained /path/to/{name}-{tag}.safetensors (or copy the hub cache folder)."
        ) from exc


def file_model_name(name: str, tag: str) -> str:
    """The architecture to give with a file of `tag`'s weights: a file carries no activation,
    so weights trained with QuickGELU (OpenAI's) need the `-quickgelu` architecture."""
    quick = open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False)
    if quick and "quickgelu" not in name and f"{name}-quickgelu" in open_clip.list_models():
        return f"{name}-quickgelu"
    return name


def _create_cached_or_download(name: str, tag: str) -> torch.nn.Module:
    """Cached weights first, without touching the network; download only if the hub answers.

    Without this, an offline machine spends a minute in the hub client's retries before failing.
    The activation is the one the weights were trained with: OpenAI's CLIPs use QuickGELU,
    which open_clip's plain configs (`RN50`, `ViT-B-16`, ...) replace by GELU unless told.
    """
    from huggingface_hub import constants

    quick_gelu = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        return open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick_gelu)
    except Exception:
        if offline:
            raise
    finally:
        constants.HF_HUB_OFFLINE = offline
    host = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=5).close()
    except OSError as exc:
        reason = f"not in the local cache, and {host.hostname} cannot be reached ({exc})"
        raise OSError(reason) from exc
    return open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick_gelu)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    return text[0] if len(text[0]) <= 300 else text[0][:300] + "..."


def _wrap(
    net: torch.nn.Module, name: str, pretrained: str, device, channels_last: bool
) -> LoadedClip:
    net = net.to(device).float().eval()
    net.requires_grad_(False)
    nhwc = channels_last and any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.visual.modules()
    )
    if nhwc:
        net.visual.to(memory_format=torch.channels_last)
    cfg = open_clip.get_model_preprocess_cfg(net)
    size = cfg.get("size", getattr(net.visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        size = size[0]
    return LoadedClip(
        model=net,
        tokenizer=open_clip.get_tokenizer(name),
        model_name=name,
        pretrained=str(Path(pretrained).resolve()) if os.path.isfile(pretrained) else pretrained,
        image_size=int(size),
        mean=tuple(cfg.get("mean", OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", OPENAI_DATASET_STD)),
        channels_last=nhwc,
    )


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Set BatchNorm running statistics to those of `images` (a random-weights helper).

    A freshly initialised ResNet's statistics do not match its activations, so it maps every
    image to nearly the same features; tests and benchmarks calibrate it first.
    """
    norms = [m for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    model.visual(images)
    for m in norms:
        m.momentum = 0.1
        m.eval()
