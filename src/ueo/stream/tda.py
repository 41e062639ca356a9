"""TDA, the training-free dynamic adapter of Karmanov et al., *Efficient Test-Time Adaptation of
Vision-Language Models*, CVPR 2024: the field's online baseline, as the authors' code
(kdiAAA/TDA, `tda_runner.py`) computes it, with one change (below).

Two caches of test images' features, per class the model predicts:
- the positive cache keeps the `pos_capacity` images of lowest prediction entropy (each the
  newest when it enters, in the order of their entropy);
- the negative cache does the same among the images whose entropy, divided by log2 of the
  number of classes (the authors' normalisation of an entropy in nats), lies strictly inside
  `neg_entropy`, and keeps with each the mask of the classes whose probability lies strictly
  inside `neg_mask`.
An image's logits (100 x cosine) gain `pos_alpha * sum_j exp(-pos_beta * (1 - f . k_j))
onehot(class_j)` over the positive cache and lose the same sum over the negative cache with
its masks for one-hots. Predictions, entropies and probabilities are the zero-shot ones;
nothing is trained.

The change: the authors' loop puts an image into the caches and then predicts it, so its own
features (at affinity 1) weigh in its prediction. A stream predicts first: an image enters the
caches after its prediction, as the rule of `ueo stream` demands (no prediction by a model that
has seen the image). A batch is predicted with the caches as they were before it, then its
images enter in order; with a batch of one this is TDA's sequence.

The caches are fixed-size tensors (classes x capacity x feature dimension), so a checkpoint
holds them as they are.
"""

from __future__ import annotations

import math

import torch

from ueo.objectives import LOGIT_SCALE
from ueo.stream.settings import TdaSettings


class Cache:
    """Per class, up to `capacity` (feature, entropy[, mask]) entries in increasing entropy."""

    def __init__(self, classes: int, capacity: int, dim: int, device: torch.device, masks: bool):
        self.capacity = capacity
        self.keys = torch.zeros(classes, capacity, dim, device=device)
        self.entropy = torch.full((classes, capacity), math.inf, device=device)
        self.count = torch.zeros(classes, dtype=torch.long, device=device)
        self.masks = torch.zeros(classes, capacity, classes, device=device) if masks else None

    def add(self, cls: int, feature: torch.Tensor, entropy: float, mask=None) -> None:
        """TDA's `update_cache`: a class with room takes the entry; a full one replaces its
        highest-entropy entry with it when its entropy is lower; then the class's entries are
        put in increasing entropy (a stable sort: the newest after equal ones)."""
        n = int(self.count[cls])
        if self.capacity == 0:
            return
        if n < self.capacity:
            slot = n
            self.count[cls] += 1
            n += 1
        elif entropy < float(self.entropy[cls, n - 1]):
            slot = n - 1
        else:
            return
        self.keys[cls, slot] = feature
        self.entropy[cls, slot] = entropy
        if self.masks is not None:
            self.masks[cls, slot] = mask
        order = torch.sort(self.entropy[cls, :n], stable=True).indices
        self.keys[cls, :n] = self.keys[cls, order]
        self.entropy[cls, :n] = self.entropy[cls, order]
        if self.masks is not None:
            self.masks[cls, :n] = self.masks[cls, order]

    def logits(self, features: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        """TDA's `compute_cache_logits`: alpha * exp(-beta (1 - f . k)) @ values, over the
        entries in class order (a mask for values in the negative cache, else the one-hot)."""
        filled = torch.arange(self.capacity, device=self.count.device) < self.count[:, None]
        keys = self.keys[filled]
        if self.masks is not None:
            values = self.masks[filled]
        else:
            classes = torch.arange(len(self.count), device=keys.device)[:, None].expand_as(filled)
            values = torch.nn.functional.one_hot(classes[filled], len(self.count)).float()
        affinity = features @ keys.t()
        return alpha * ((-1) * (beta - beta * affinity)).exp() @ values

    def __len__(self) -> int:
        return int(self.count.sum())

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}/keys": self.keys, f"{prefix}/entropy": self.entropy}
        out[f"{prefix}/count"] = self.count
        if self.masks is not None:
            out[f"{prefix}/masks"] = self.masks
        return out

    def load(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        for name in ("keys", "entropy", "count", "masks"):
            if getattr(self, name) is not None:
                getattr(self, name).copy_(tensors[f"{prefix}/{name}"])


class Tda:
    """TDA's two caches and its logits (module docstring)."""

    def __init__(self, settings: TdaSettings, classes: int, dim: int, device: torch.device):
        self.settings = settings
        self.classes = classes
        self.positive = Cache(classes, settings.pos_capacity, dim, device, masks=False)
        self.negative = Cache(classes, settings.neg_capacity, dim, device, masks=True)

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor | None:
        """What the caches add to a batch's logits (100 x cosine): the positive cache's minus
        the negative cache's; None while both are empty (the zero-shot logits stand)."""
        s = self.settings
        if not len(self.positive) and not len(self.negative):
            return None
        out = torch.zeros(len(features), self.classes, device=features.device)
        if len(self.positive):
            out += self.positive.logits(features, s.pos_alpha, s.pos_beta)
        if len(self.negative):
            out -= self.negative.logits(features, s.neg_alpha, s.neg_beta)
        return out

    @torch.no_grad()
    def update(self, features: torch.Tensor, cos: torch.Tensor) -> None:
        """The batch's images enter the caches in order, by their zero-shot prediction."""
        s = self.settings
        logits = LOGIT_SCALE * cos
        probs = logits.softmax(dim=1)
        entropy = -(probs * logits.log_softmax(dim=1)).sum(dim=1)  # nats, as TDA's code
        normalised = entropy / math.log2(self.classes)
        preds = logits.argmax(dim=1).tolist()
        lo, hi = s.neg_mask
        for i, (cls, h, h_norm) in enumerate(
            zip(preds, entropy.tolist(), normalised.tolist(), strict=True)
        ):
            self.positive.add(cls, features[i], h)
            if s.neg_entropy[0] < h_norm < s.neg_entropy[1]:
                mask = ((probs[i] > lo) & (probs[i] < hi)).float()
                self.negative.add(cls, features[i], h, mask)

    def reset(self) -> None:
        """Empty caches: the zero-shot model again."""
        for cache in (self.positive, self.negative):
            cache.count.zero_()
            cache.entropy.fill_(math.inf)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.positive.tensors("tda/positive"), **self.negative.tensors("tda/negative")}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.positive.load(tensors, "tda/positive")
        self.negative.load(tensors, "tda/negative")
