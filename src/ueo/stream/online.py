"""Predict, then update, one batch at a time: the engine of `ueo stream`, and its Python API.

For each batch the current model predicts first (the rows of `ueo predict`, with the unknown
flag of the threshold so far), then one step of the method updates it on that batch, so no
prediction is ever made by a model that has seen the image. The prediction and the update
share one forward pass: the update's loss is taken on the very cosines the rows came from (the
test transform, no augmentation), so a step costs a forward and a backward pass, not two
forwards. Methods with fixed per-sample values (UEO's MCM weights, UPL's pseudo-labels) get them
from the zero-shot model's cosines of the batch, computed when it arrives: free while the model
is in its zero-shot state (the first batch, after a reset) or when the image tower is not tuned
(`lr_norm` 0: the zero-shot prompt's text features, kept, against the batch's image features);
otherwise a second, gradient-free image-tower pass with the zero-shot norm affines.

    with OnlineStream(model, StreamSettings(method="ueo", batch_size=16)) as stream:
        rows = stream.step(images)        # a list of PIL images or an N x H x W x 3 array
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
from PIL import Image

from ueo.cache import split_transform
from ueo.checkpoint import pack_optimizer, under_prefix, unpack_optimizer
from ueo.data import MemoryImages
from ueo.errors import UeoError
from ueo.methods import TRAIN_MASK, get_method
from ueo.model import UeoModel, frozen_weights_in, tuning
from ueo.names import UNLABELED
from ueo.objectives import LOGIT_SCALE, mcm_score
from ueo.predictions import Predictions
from ueo.recipe import Runtime
from ueo.runtime import DTYPES, checked_runtime, resolve_device
from ueo.stream.settings import TDA, StreamSettings
from ueo.stream.tda import Tda
from ueo.stream.threshold import RunningOtsu
from ueo.timing import Clock
from ueo.training import FINITE, StepGuard, training_step


class OnlineStream:
    """A model adapted while it predicts (module docstring); use it in a `with` block, which
    puts the model in the state the method tunes and back."""

    def __init__(
        self,
        model: UeoModel,
        settings: StreamSettings | None = None,
        runtime: Runtime | None = None,
    ):
        self.settings = (settings or StreamSettings()).validate()
        self.recipe = recipe = self.settings.step_recipe
        self.runtime = checked_runtime(runtime, recipe.precision)
        self.device = resolve_device(self.runtime.device)
        self.model = model.to(self.device)
        _check_prompt(model, recipe)
        self.method = None if self.settings.method == TDA else get_method(recipe.method)
        self.split = split_transform(model.clip.test_transform())
        norms = recipe.norm_layers
        self.zero_state = {k: v.clone() for k, v in model.adapter_state(norms).items()}
        self.otsu = RunningOtsu()
        self.clock = Clock()
        self.batches = 0  # batches predicted
        self.skipped_steps = 0
        self.pristine = True  # the tuned tensors are the zero-shot ones
        self.domain: str | None = None
        self.optimizer = self.guard = self.scaler = self.tda = None
        self._stack: ExitStack | None = None
        self._pending = None  # what `update` needs of the batch `predict` saw

    # --- the block ---------------------------------------------------------------------------

    def __enter__(self) -> OnlineStream:
        stack = ExitStack()
        stack.enter_context(frozen_weights_in(self.model, DTYPES[self.recipe.precision]))
        with torch.no_grad():
            self.zs_text = self.model.cosines(self._empty(), self.recipe.precision)[2].detach()
        groups = []
        if self.method is not None and self.method.trains:
            groups = stack.enter_context(tuning(self.model, self.recipe))
        if groups:
            self.optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0)
            self.guard = StepGuard(self.optimizer, self.recipe.on_nonfinite)
            if self.recipe.precision == "fp16":
                self.scaler = torch.amp.GradScaler(self.device.type)
        elif self.method is None:
            dim = self.zs_text.shape[1]
            self.tda = Tda(self.settings.tda, self.model.prompt.num_classes, dim, self.device)
        self.prompt_tuned = self.optimizer is not None and self.recipe.lr_prompt > 0
        self.image_tuned = self.optimizer is not None and self.recipe.lr_norm > 0
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        self._pending = None
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _empty(self) -> torch.Tensor:
        size = self.model.clip.image_size
        return torch.empty((0, 3, size, size), device=self.device)

    # --- one batch ---------------------------------------------------------------------------

    def step(
        self,
        images: Sequence[Image.Image] | np.ndarray,
        names: Sequence[str] | None = None,
        labels: np.ndarray | None = None,
        domain: str | None = None,
    ) -> Predictions:
        """Predict a batch of images in memory (PIL images of any mode, or an N x H x W x 3
        uint8 RGB array; named "0", "1", ... unless `names` are given), then update on it."""
        batch = MemoryImages(images, names)
        pixels = torch.stack([self.split.pixels(batch.rgb(i)) for i in range(len(batch))])
        rows = self.predict(pixels, batch.paths, labels, domain)
        self.update()
        return rows

    def predict(
        self,
        pixels: torch.Tensor,
        names: Sequence[str],
        labels: np.ndarray | None = None,
        domain: str | None = None,
    ) -> Predictions:
        """The rows of a batch (uint8 pixels of the test transform, N x 3 x H x W, as
        `ueo.cache.Split.pixels` gives them) by the model as it is; `update` then steps on it.

        With `reset="domain"`, a batch whose `domain` differs from the last one's starts from
        the zero-shot state. `labels` (known-class index, OOD -1, unlabeled -2) serve only a
        method that uses them (`ueo-oracle`)."""
        if self._stack is None:
            raise RuntimeError("use OnlineStream in a `with` block")
        if self.settings.reset == "domain" and self.batches and domain != self.domain:
            self.reset()
        self.domain = domain
        with self.clock("predict"):
            x = self.split.finish(pixels.to(self.device, non_blocking=True))
            if self.tda is not None:
                with torch.no_grad():
                    cos, feats, _ = self.model.cosines(x, self.recipe.precision, self.zs_text)
                    added = self.tda.logits(feats)
                # TDA's logits are 100 cos + the caches': shown as the cosines they amount to
                shown = cos if added is None else cos + added / LOGIT_SCALE
                self._pending = ("tda", feats, cos)
            elif self.optimizer is None:
                with torch.no_grad():
                    shown = self.model.cosines(x, self.recipe.precision, self.zs_text)[0]
                self._pending = ("none",)
            else:
                text = None if self.prompt_tuned else self.zs_text
                with torch.enable_grad():
                    cos, feats, text = self.model.cosines(x, self.recipe.precision, text)
                shown = cos.detach()
                labels = np.full(len(x), UNLABELED) if labels is None else np.asarray(labels)
                self._pending = ("step", x, cos, feats, text, labels)
            rows = self._rows(shown, names)
        self.batches += 1
        return rows

    def _rows(self, cos: torch.Tensor, names: Sequence[str]) -> Predictions:
        """What `ueo.api.predict` computes from a batch's cosines, with the threshold so far."""
        cos = cos.float().cpu().numpy()
        if not np.isfinite(cos).all():
            raise UeoError(
                f"The model gives non-finite scores at batch {self.batches + 1}: the stream "
                "diverged (lower the learning rates)."
            )
        pred = cos.argmax(axis=1)
        logits = LOGIT_SCALE * cos
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        mcm = mcm_score(torch.from_numpy(cos)).numpy()
        threshold = self.settings.threshold
        if threshold is None:
            threshold = self.otsu.add(mcm)
        rows = np.arange(len(cos))
        return Predictions(
            list(names), rows, self.model.class_names, pred, probs[rows, pred], mcm, threshold
        )

    def update(self) -> None:
        """One step of the method on the batch last predicted (TDA: its images enter the
        caches); then, with `reset="batch"`, the zero-shot state again."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("update() follows predict()")
        with self.clock("update"):
            if pending[0] == "tda":
                self.tda.update(*pending[1:])
            elif pending[0] == "step":
                self._step(*pending[1:])
        if self.settings.reset == "batch":
            self.reset()

    def _step(self, x, cos, feats, text, labels: np.ndarray) -> None:
        method, recipe = self.method, self.recipe
        if method.needs_labels and (labels == UNLABELED).any():
            raise UeoError(f"Method {method.name} uses labels; the stream's images carry none.")
        fixed = {}
        if method.fixed is not None:
            zeroshot = self._zeroshot_cos(x, cos, feats).cpu()
            fixed = method.fixed(zeroshot, torch.from_numpy(labels), recipe)
        if TRAIN_MASK in fixed:
            keep = fixed[TRAIN_MASK].to(torch.bool)
            if not keep.any():
                return
            cos, feats = cos[keep.to(cos.device)], feats[keep.to(feats.device)]
            fixed = {k: v[keep] for k, v in fixed.items()}
        fixed = {k: v.to(self.device) for k, v in fixed.items()}
        training_step(
            self.model,
            x,
            fixed,
            self.optimizer,
            method,
            recipe,
            scaler=self.scaler,
            features=lambda _: (cos, feats, text),
            guard=self.guard,
            where=self.batches,
        )
        for verdict in self.guard.read():
            if verdict.kind == FINITE:
                self.pristine = False
            elif recipe.on_nonfinite == "skip":
                self.skipped_steps += 1
            else:
                raise UeoError(
                    f"{verdict.what[0].upper()}{verdict.what[1:]} is not finite at batch "
                    f"{verdict.where}: stopped (lower the learning rates, or --on-nonfinite skip)."
                )

    def _zeroshot_cos(self, x: torch.Tensor, cos: torch.Tensor, feats: torch.Tensor):
        """The zero-shot model's cosines of the batch (module docstring: when they cost a
        second image-tower pass)."""
        if self.pristine:
            return cos.detach()
        if not self.image_tuned:
            return feats.detach() @ self.zs_text.t()
        with self.clock("zeroshot_pass"), torch.no_grad(), self._zero_shot_norms():
            return self.model.cosines(x, self.recipe.precision, self.zs_text)[0]

    @contextmanager
    def _zero_shot_norms(self) -> Iterator[None]:
        """The tuned norm affines hold their zero-shot values inside the block."""
        params = self.model.norm_parameters(self.recipe.norm_layers)
        saved = {name: p.data for name, p in params.items()}
        try:
            for name, p in params.items():
                p.data = self.zero_state[name]
            yield
        finally:
            for name, p in params.items():
                p.data = saved[name]

    def reset(self) -> None:
        """Back to the zero-shot state: tuned tensors, optimiser and TDA's caches (the
        threshold's scores are kept: it is over the whole stream)."""
        self.model.load_adapter_state(self.zero_state, self.recipe.norm_layers)
        if self.optimizer is not None:
            self.optimizer.state.clear()
        if self.tda is not None:
            self.tda.reset()
        self.pristine = True

    # --- checkpoints -------------------------------------------------------------------------

    @property
    def threshold(self) -> float:
        """The unknown threshold now: the fixed one, or Otsu's over the scores so far."""
        fixed = self.settings.threshold
        return fixed if fixed is not None else self.otsu.threshold

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and plain data that put a stream back where it is (`load`)."""
        tuned = self.model.adapter_state(self.recipe.norm_layers)
        tensors = {f"tuned/{k}": v for k, v in tuned.items()}
        meta = {
            "batches": self.batches,
            "skipped_steps": self.skipped_steps,
            "pristine": self.pristine,
            "domain": self.domain,
        }
        if self.optimizer is not None:
            optim, meta["optimizer"] = pack_optimizer(self.optimizer.state_dict())
            tensors.update(optim)
            meta["scaler"] = self.scaler.state_dict() if self.scaler is not None else None
        if self.tda is not None:
            tensors.update(self.tda.tensors())
        arrays, meta["otsu"] = self.otsu.state()
        tensors.update({f"otsu/{k}": torch.from_numpy(v) for k, v in arrays.items()})
        return tensors, meta

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.model.load_adapter_state(under_prefix(tensors, "tuned"), self.recipe.norm_layers)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(unpack_optimizer(tensors, meta["optimizer"]))
            if self.scaler is not None and meta.get("scaler"):
                self.scaler.load_state_dict(meta["scaler"])
        if self.tda is not None:
            self.tda.load(tensors)
        otsu = {k: v.numpy() for k, v in under_prefix(tensors, "otsu").items()}
        self.otsu.load(otsu, meta["otsu"])
        self.batches, self.skipped_steps = meta["batches"], meta["skipped_steps"]
        self.pristine, self.domain = meta["pristine"], meta["domain"]


def _check_prompt(model: UeoModel, recipe) -> None:
    """The model's prompt must be the recipe's (the adapter rebuilds it from the recipe)."""
    prompt = model.prompt
    if prompt.ctx_init != recipe.ctx_init.strip() or (
        recipe.n_ctx is not None and recipe.n_ctx != prompt.n_ctx
    ):
        raise UeoError(
            f"The model's prompt (ctx_init {prompt.ctx_init!r}, {prompt.n_ctx} tokens) is not "
            f"the recipe's (ctx_init {recipe.ctx_init!r}, n_ctx {recipe.n_ctx}); build the model "
            "with the recipe: load_model(..., recipe=recipe)."
        )
