"""The method registry: what each training method is, in one place.

A method is its fixed per-sample values, computed once from the zero-shot model before
training (UEO's MCM weights, the oracle's label weights, ...), and its loss on a batch.
Adding a method is one `register(Method(...))` here plus its test; the command line's
choices and the benchmark defaults are read from this registry (docs/adding-a-method.md).
Like ueo.objectives, this module needs no torch at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ueo.errors import UeoError
from ueo.names import OOD
from ueo.objectives import (
    entmin_loss,
    infomax_loss,
    mcm_score,
    pouf_loss,
    ueo_loss,
    upl_loss,
    upl_select,
)

if TYPE_CHECKING:
    from torch import Tensor

# What a method reads its settings from: a `ueo.recipe.Recipe`, not imported (even for type
# checkers), since recipe.py checks method names against this registry.
Recipe = Any

TRAIN_MASK = "train"  # a fixed value under this key restricts training to those samples
ORACLE_EPS = 1e-3  # the reference's oracle weight: 1[known class] + 1e-3


@dataclass(frozen=True)
class Batch:
    """What a loss sees for one training batch.

    `logits` = 100 * cos (fp32), `image_features` and `text_features` L2-normalised, `fixed`
    the batch's rows of the method's fixed per-sample values.
    """

    logits: Tensor
    image_features: Tensor
    text_features: Tensor
    fixed: dict[str, Tensor]
    recipe: Recipe


@dataclass(frozen=True)
class Method:
    """One training method.

    `fixed(zeroshot_cos, labels, recipe)` -> per-sample tensors (first axis = sample), from
    the zero-shot cosines of the unlabeled set (test transform) and its labels (OOD = -1,
    unlabeled = -2); `loss(batch)` -> scalar. `loss=None` means no training (zero-shot).
    """

    name: str
    summary: str
    loss: Callable[[Batch], Tensor] | None = None
    fixed: Callable[[Tensor, Tensor, Recipe], dict[str, Tensor]] | None = None
    needs_labels: bool = False

    @property
    def trains(self) -> bool:
        return self.loss is not None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UeoError(f"Unknown method '{name}'; choose from {', '.join(METHODS)}.")
    return METHODS[name]


def method_names(trains_only: bool = False) -> list[str]:
    return [m.name for m in METHODS.values() if m.trains or not trains_only]


def _mcm_weights(cos: Tensor, labels: Tensor, recipe: Recipe) -> dict[str, Tensor]:
    return {"weight": mcm_score(cos.nan_to_num())}


def _oracle_weights(cos: Tensor, labels: Tensor, recipe: Recipe) -> dict[str, Tensor]:
    return {"weight": (labels != OOD).float() + ORACLE_EPS}


def _upl_pseudo_labels(cos: Tensor, labels: Tensor, recipe: Recipe) -> dict[str, Tensor]:
    pseudo, selected = upl_select(cos, recipe.upl_k)
    return {"label": pseudo, TRAIN_MASK: selected}


def _weighted_ueo(batch: Batch) -> Tensor:
    return ueo_loss(batch.logits, batch.fixed["weight"], batch.recipe.trade)


def _pouf(batch: Batch) -> Tensor:
    r = batch.recipe
    return pouf_loss(
        batch.logits, batch.image_features, batch.text_features, r.pouf_transport, r.pouf_im
    )


register(Method("zeroshot", "no training: the pretrained model with the initial prompts"))
register(
    Method(
        "entmin",
        "entropy minimisation (TENT's objective): mean prediction entropy",
        loss=lambda b: entmin_loss(b.logits),
    )
)
register(
    Method(
        "infomax",
        "InfoMax / SHOT-IM: mean entropy minus trade x entropy of the mean prediction",
        loss=lambda b: infomax_loss(b.logits, b.recipe.trade),
    )
)
register(
    Method(
        "pouf",
        "POUF: conditional transport between images and class prompts, plus information "
        "maximisation",
        loss=_pouf,
    )
)
register(
    Method(
        "upl",
        "UPL: cross-entropy on the zero-shot pseudo-labels of the top-K images per class",
        loss=lambda b: upl_loss(b.logits, b.fixed["label"]),
        fixed=_upl_pseudo_labels,
    )
)
register(
    Method(
        "ueo",
        "UEO: entropy weighted by zero-shot MCM, marginal entropy weighted by 1/MCM",
        loss=_weighted_ueo,
        fixed=_mcm_weights,
    )
)
register(
    Method(
        "ueo-oracle",
        "UEO with label-given weights (1 + 1e-3 known, 1e-3 unknown): analysis only",
        loss=_weighted_ueo,
        fixed=_oracle_weights,
        needs_labels=True,
    )
)
