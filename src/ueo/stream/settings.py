"""What determines a stream's numbers: the method, the batch, the resets, the threshold rule, the
recipe of the update step and TDA's settings. Plain data, checked without torch (the command
line checks it before it imports anything heavy)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ueo.checks import check_choice, check_float, check_int, check_threshold
from ueo.errors import UeoError
from ueo.methods import method_names
from ueo.recipe import Recipe

RESETS = ("none", "batch", "domain")  # continual, episodic, at each change of the domain column
TDA = "tda"  # the training-free method of Karmanov et al. (CVPR 2024): ueo.stream.tda
STREAM_EPOCHS = 1  # a stream is one pass: what the adapter's recipe says
DEFAULT_CHECKPOINT_EVERY = 100  # batches between two checkpoints


def stream_methods() -> list[str]:
    """Every registered method (one step of it per batch) and TDA."""
    return [*method_names(), TDA]


@dataclass(frozen=True)
class TdaSettings:
    """TDA's positive and negative caches (Karmanov et al., CVPR 2024), with the defaults of
    the authors' code (kdiAAA/TDA, configs/imagenet.yaml, the setting of their single-view
    ImageNet run; TomSheng21/tta-vlm uses the same for ImageNet, Office-Home and DomainNet).

    The positive cache keeps, per predicted class, the `pos_capacity` lowest-entropy images;
    the negative cache, the `neg_capacity` lowest-entropy images among those whose normalised
    entropy lies strictly inside `neg_entropy`, with a mask of the classes whose zero-shot
    probability lies strictly inside `neg_mask`. An image's logits gain `alpha * exp(-beta *
    (1 - affinity))` summed over the cached images (affinity: cosine of image features).
    """

    pos_capacity: int = 3
    pos_alpha: float = 2.0
    pos_beta: float = 5.0
    neg_capacity: int = 2
    neg_alpha: float = 0.117
    neg_beta: float = 1.0
    neg_entropy: tuple[float, float] = (0.2, 0.5)
    neg_mask: tuple[float, float] = (0.03, 1.0)

    def validate(self) -> TdaSettings:
        check_int("tda pos_capacity", self.pos_capacity, 0)
        check_int("tda neg_capacity", self.neg_capacity, 0)
        for name in ("pos_alpha", "pos_beta", "neg_alpha", "neg_beta"):
            check_float(f"tda {name}", getattr(self, name))
        for name in ("neg_entropy", "neg_mask"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high:
                raise UeoError(f"TDA's {name} must be a range (low <= high), not {low, high}.")
        return self


@dataclass(frozen=True)
class StreamSettings:
    """What determines a stream's numbers (docs/stream.md), its runtime aside.

    `method`: a registered method (one step of it on every batch, after the batch's rows are
    written) or `tda`. `batch_size`: images per batch (the last one may be short; a batch never
    spans two domains). `reset`: `none` (continual), `batch` (the zero-shot state again after
    every batch: episodic), `domain` (at each change of the list's domain column).
    `threshold`: a fixed MCM threshold; None is Otsu's over the MCM scores of the rows written
    so far, the batch's own included. `recipe`: the update step's learning rates, trade-off,
    precision, prompt and tuned layers (its method, batch size, epochs and augmentation are the
    stream's: `step_recipe`). `tda`: TDA's settings.
    """

    method: str = "ueo"
    batch_size: int = 64
    reset: str = "none"
    threshold: float | None = None
    recipe: Recipe = field(default_factory=Recipe)
    tda: TdaSettings = field(default_factory=TdaSettings)

    def validate(self) -> StreamSettings:
        check_choice("method", self.method, tuple(stream_methods()))
        check_int("batch-size", self.batch_size, 1)
        check_choice("reset", self.reset, RESETS)
        check_threshold(self.threshold)
        self.step_recipe.validate()
        self.tda.validate()
        return self

    @property
    def step_recipe(self) -> Recipe:
        """The recipe of the update step, as the adapter stores it: the stream's method (TDA
        tunes no tensor: `zeroshot`), batch size, one pass, no augmentation (the update sees
        each image as it was predicted)."""
        return self.recipe.replace(
            method="zeroshot" if self.method == TDA else self.method,
            batch_size=self.batch_size,
            epochs=STREAM_EPOCHS,
            augment="none",
        )
