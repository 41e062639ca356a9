"""The zero-shot model a stream keeps beside the one it adapts (ueo.stream.online).

A reset puts the tuned tensors back to their zero-shot values, and the methods with fixed
per-sample values (UEO's MCM weights, UPL's pseudo-labels) take them from the zero-shot
model's cosines of each batch. Those cost nothing while the model is in its zero-shot state
(the first batch, after a reset: the prediction's pass is the zero-shot pass) and nothing when
the image tower is not tuned (`lr_norm` 0: the zero-shot prompt's text features, kept,
against the batch's image features); otherwise they cost a second, gradient-free image-tower
pass with the norm affines put back to their zero-shot values for it (docs/stream.md,
"Methods").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ueo.model import UeoModel
from ueo.recipe import Recipe
from ueo.timing import Clock


class ZeroShot:
    """The zero-shot state of a stream's model: its tuned tensors' values, its prompt's text
    features, whether the model is still in it, and each batch's zero-shot cosines."""

    def __init__(self, model: UeoModel, recipe: Recipe, clock: Clock):
        self.model, self.recipe, self.clock = model, recipe, clock
        norms = recipe.norm_layers
        self.tensors = {k: v.clone() for k, v in model.adapter_state(norms).items()}
        self.text: torch.Tensor | None = None  # `encode_text`, once the weights are in place
        self.pristine = True  # the tuned tensors are the zero-shot ones

    def encode_text(self, device: torch.device) -> None:
        """Keep the zero-shot prompt's text features, computed with the frozen weights as the
        stream holds them (`ueo.model.frozen_weights_in`), so that they are the prediction's."""
        size = self.model.clip.image_size
        with torch.no_grad():
            empty = torch.empty((0, 3, size, size), device=device)
            self.text = self.model.cosines(empty, self.recipe.precision)[2].detach()

    def cosines(
        self, x: torch.Tensor, cos: torch.Tensor, feats: torch.Tensor, image_tuned: bool
    ) -> torch.Tensor:
        """The zero-shot model's cosines of the batch `x`, whose cosines and image features by
        the model as it is are `cos` and `feats` (module docstring: when they cost a second
        image-tower pass)."""
        if self.pristine:
            return cos.detach()
        if not image_tuned:
            return feats.detach() @ self.text.t()
        with self.clock("zeroshot_pass"), torch.no_grad(), self._norms():
            return self.model.cosines(x, self.recipe.precision, self.text)[0]

    @contextmanager
    def _norms(self) -> Iterator[None]:
        """The tuned norm affines hold their zero-shot values inside the block."""
        params = self.model.norm_parameters(self.recipe.norm_layers)
        saved = {name: p.data for name, p in params.items()}
        try:
            for name, p in params.items():
                p.data = self.tensors[name]
            yield
        finally:
            for name, p in params.items():
                p.data = saved[name]

    def restore(self) -> None:
        """The model's tuned tensors back to their zero-shot values."""
        self.model.load_adapter_state(self.tensors, self.recipe.norm_layers)
        self.pristine = True
