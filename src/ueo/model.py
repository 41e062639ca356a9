"""A CLIP model with learnable prompts and tunable image-tower normalisation affines.

The seam, in the spirit of tent: `configure_model` says what is tuned (and keeps
normalisation statistics frozen), `collect_params` returns the optimiser's parameter groups.

Which normalisation layers are tuned (`Recipe.norm_layers`):

* `reference` (default): what the authors' script tunes. It picks image-tower parameters
  whose name contains `bn` or `ln`; ueo reaches the same set by structure: every
  normalisation layer except those inside a residual block's projection shortcut
  (`downsample`), whose BatchNorm the name rule misses (docs/spec.md, "What is tuned").
* `all`: every normalisation layer of the image tower.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ueo.clip import LoadedClip
from ueo.errors import UeoError
from ueo.prompts import PromptLearner
from ueo.recipe import DEFAULT_CTX_INIT, DEFAULT_SEED, NORM_LAYERS, Recipe
from ueo.runtime import autocast

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
CTX_NAME = "prompt.ctx"


def _shortcut_modules(visual: nn.Module) -> set[int]:
    """ids of the modules inside projection shortcuts (`block.downsample`) of residual blocks."""
    inside: set[int] = set()
    for module in visual.modules():
        shortcut = getattr(module, "downsample", None)
        if isinstance(shortcut, nn.Module):
            inside.update(id(m) for m in shortcut.modules())
    return inside


def norm_parameters(net: nn.Module, which: str = "all") -> dict[str, nn.Parameter]:
    """Affine parameters of the image tower's normalisation layers, under the model's names.

    `which` is `all` or `reference` (see the module docstring).
    """
    if which not in NORM_LAYERS:
        raise UeoError(f"--norm-layers must be one of {', '.join(NORM_LAYERS)}, not {which!r}.")
    skip = _shortcut_modules(net.visual) if which == "reference" else set()
    params = {}
    for name, module in net.visual.named_modules():
        if isinstance(module, NORM_TYPES) and id(module) not in skip:
            for pname, p in module.named_parameters(recurse=False):
                params[f"visual.{name}.{pname}" if name else f"visual.{pname}"] = p
    return params


class UeoModel(nn.Module):
    """What UEO tunes: the shared prompt context and the image tower's norm affines.

    Normalisation statistics are never updated: `configure_model` puts the network in eval
    mode, and nothing in ueo calls `train()`.
    """

    def __init__(
        self,
        clip: LoadedClip,
        class_names: list[str],
        n_ctx: int | None = None,
        ctx_init: str = DEFAULT_CTX_INIT,
        bucketing: bool = True,
        seed: int = DEFAULT_SEED,
    ):
        super().__init__()
        self.clip = clip
        self.net = clip.model
        self.prompt = PromptLearner(
            self.net, clip.tokenizer, class_names, n_ctx, ctx_init, bucketing, seed
        )
        self.eval()

    @property
    def class_names(self) -> list[str]:
        return self.prompt.class_names

    def check_prompt(self, recipe: Recipe) -> None:
        """The prompt must be the one `recipe` describes: it is built with the model (and an
        adapter rebuilds it from its recipe), not by adapt()."""
        prompt = self.prompt
        if prompt.ctx_init != recipe.ctx_init.strip() or (
            recipe.n_ctx is not None and recipe.n_ctx != prompt.n_ctx
        ):
            raise UeoError(
                f"The model's prompt (ctx_init {prompt.ctx_init!r}, {prompt.n_ctx} tokens) is not "
                f"the recipe's (ctx_init {recipe.ctx_init!r}, n_ctx {recipe.n_ctx}); build the "
                "model with the recipe: load_model(..., recipe=recipe)."
            )

    def norm_parameters(self, which: str = "reference") -> dict[str, nn.Parameter]:
        return norm_parameters(self.net, which)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.clip.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return F.normalize(self.net.encode_image(images).float(), dim=-1)

    def text_features(self) -> torch.Tensor:
        return self.prompt().float()

    def forward(self, images: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine similarities, images x known classes."""
        text = self.text_features() if text is None else text
        return self.image_features(images) @ text.t()

    def cosines(
        self, images: torch.Tensor, precision: str = "fp32", text: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cosines, image features and text features of a batch, all fp32: the forward pass
        of training and inference.

        The towers run under `precision`'s autocast; the cosines are taken in fp32 from the
        features, so that a low precision touches the towers only. `text`: precomputed text
        features (a frozen prompt's). The image tower runs without autograd when none of its
        parameters is tuned. An empty batch gives no rows but the text features.
        """
        image_grad = torch.is_grad_enabled() and any(
            p.requires_grad for p in self.net.visual.parameters()
        )
        with autocast(images.device, precision):
            if text is None:
                text = self.text_features()
            if len(images):
                with torch.set_grad_enabled(image_grad):
                    feats = self.image_features(images)
            else:  # an empty part of a batch split over processes: no image, but the text
                feats = text.new_zeros((0, text.shape[-1]))
        feats, text = feats.float(), text.float()
        return feats @ text.t(), feats, text

    def adapter_state(self, norm_layers: str = "reference") -> dict[str, torch.Tensor]:
        """The tuned tensors under self-describing names (the model's own parameter names)."""
        state = {CTX_NAME: self.prompt.ctx.detach()}
        state.update({k: v.detach() for k, v in self.norm_parameters(norm_layers).items()})
        return state

    def load_adapter_state(
        self, state: dict[str, torch.Tensor], norm_layers: str = "reference"
    ) -> None:
        """Put tuned tensors back; shapes and names must match this model exactly."""
        params = {CTX_NAME: self.prompt.ctx, **self.norm_parameters(norm_layers)}
        unknown = sorted(set(state) - set(params))
        missing = sorted(set(params) - set(state))
        if unknown or missing:
            raise UeoError(
                f"Adapter does not fit this model: unknown tensors {unknown[:3]}, missing "
                f"{missing[:3]}."
            )
        with torch.no_grad():
            for name, value in state.items():
                if params[name].shape != value.shape:
                    raise UeoError(
                        f"Adapter tensor {name} has shape {tuple(value.shape)}, the model "
                        f"expects {tuple(params[name].shape)}."
                    )
                params[name].copy_(value.to(params[name].device))


def configure_model(model: UeoModel, recipe: Recipe) -> UeoModel:
    """Freeze everything, then let gradients reach the groups the recipe tunes (lr > 0).

    The network stays in eval mode: BatchNorm uses and keeps its running statistics.
    """
    model.eval()
    model.requires_grad_(False)
    model.prompt.ctx.requires_grad_(recipe.lr_prompt > 0)
    for p in model.norm_parameters(recipe.norm_layers).values():
        p.requires_grad_(recipe.lr_norm > 0)
    return model


def collect_params(model: UeoModel, recipe: Recipe) -> list[dict]:
    """The optimiser's groups, `prompt` and `norm`, with their learning rates; lr 0 = absent."""
    groups = []
    if recipe.lr_prompt > 0:
        groups.append({"name": "prompt", "params": [model.prompt.ctx], "lr": recipe.lr_prompt})
    norm = list(model.norm_parameters(recipe.norm_layers).values())
    if recipe.lr_norm > 0 and norm:
        groups.append({"name": "norm", "params": norm, "lr": recipe.lr_norm})
    return groups


# Modules whose every weight autocast casts to the low precision at each call: matrix products
# and convolutions. Normalisation layers are left alone (autocast runs them in fp32, and their
# affines may be tuned), as are embeddings added elementwise.
LOW_PRECISION_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)
BARE_PROJECTIONS = ("text_projection", "visual.proj")  # open_clip's `x @ proj` parameters


def autocast_weights(net: nn.Module) -> list[nn.Parameter]:
    """The frozen parameters that autocast casts at every use (see LOW_PRECISION_MODULES)."""
    found = {}
    for module in net.modules():
        if isinstance(module, LOW_PRECISION_MODULES):
            for p in module.parameters(recurse=False):
                found[id(p)] = p
    for name, p in net.named_parameters():
        if name in BARE_PROJECTIONS:
            found[id(p)] = p
    return [p for p in found.values() if not p.requires_grad]


@contextmanager
def frozen_weights_in(model: UeoModel, dtype: torch.dtype | None):
    """Hold the frozen matmul and convolution weights in `dtype` for the block.

    Autocast caches its casts only for leaf tensors that require gradients, so it casts every
    frozen weight again at every op (~870 copies per RN50 step). Cast once here, autocast finds
    them in its precision and casts nothing: the values it computes with are the same, so the
    numbers are too. Only inside autocast to `dtype`: an fp32 op would reject them. The fp32
    originals are put back when the block ends, even on error.
    """
    if dtype is None:
        yield
        return
    originals = [(p, p.data) for p in autocast_weights(model.net)]
    try:
        for p, data in originals:
            p.data = data.to(dtype)
        yield
    finally:
        for p, data in originals:
            p.data = data


@contextmanager
def tuning(model: UeoModel, recipe: Recipe):
    """`configure_model` for the duration of a block; everything is frozen again after it."""
    configure_model(model, recipe)
    try:
        yield collect_params(model, recipe)
    finally:
        model.requires_grad_(False)
