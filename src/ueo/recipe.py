"""What determines the numbers (`Recipe`) and how to run (`Runtime`), kept apart.

A `Recipe` is the whole experiment: two runs with equal recipes on the same model and data
compute the same result, whatever their `Runtime` (device aside, up to floating-point
rounding). Its fingerprint is therefore what a benchmark sweep compares to decide whether a
finished run can be reused. Both are plain data with no torch import, so the command line
can be built and validated before any heavy library is loaded.

Defaults are the reference recipe of docs/spec.md.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass, fields, replace

from ueo.checks import check_choice, check_float, check_int
from ueo.errors import UeoError
from ueo.methods import get_method

PRECISIONS = ("fp32", "bf16", "fp16")
AUGMENTATIONS = ("default", "none")
NORM_LAYERS = ("reference", "all")
BAD_IMAGE_POLICIES = ("skip", "error")
NONFINITE_POLICIES = ("stop", "skip")
LOG_TARGETS = ("files", "tensorboard")
DEFAULT_CTX_INIT = "a photo of a"
DEFAULT_SEED = 2023
MAX_SEED = 2**63 - 1  # torch and numpy generators take any seed up to this
FLOAT32_MAX = 3.4028234663852886e38  # a learning rate multiplies fp32 gradients


@dataclass(frozen=True)
class Recipe:
    """The settings that determine a run's numbers (docs/spec.md, "Optimisation defaults").

    `norm_layers`: `reference` tunes the normalisation layers the authors' script tunes,
    `all` every normalisation layer of the image tower (see ueo.model). The `pouf_*` and
    `upl_*` settings are those methods' own (docs/method.md); other methods ignore them.
    `on_nonfinite`: a non-finite loss, gradient or tuned parameter stops the run (`stop`) or
    the step is undone and the run goes on (`skip`, which changes the numbers).
    """

    method: str = "ueo"
    epochs: int = 50
    batch_size: int = 64
    lr_prompt: float = 1e-4
    lr_norm: float = 1e-4
    trade: float = 1.0
    seed: int = DEFAULT_SEED
    augment: str = "default"
    precision: str = "fp32"
    norm_layers: str = "reference"
    n_ctx: int | None = None
    ctx_init: str = DEFAULT_CTX_INIT
    pouf_transport: float = 1.0
    pouf_im: float = 0.3
    upl_k: int = 16
    on_nonfinite: str = "stop"

    def validate(self) -> Recipe:
        """Raise a one-line UeoError naming the first bad setting; returns self."""
        for name in ("method", "ctx_init"):
            if not isinstance(getattr(self, name), str):
                raise UeoError(
                    f"--{name.replace('_', '-')} must be text, not {getattr(self, name)!r}."
                )
        get_method(self.method)
        check_int("epochs", self.epochs, 0)
        check_int("batch-size", self.batch_size, 1)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_float("lr-prompt", self.lr_prompt, FLOAT32_MAX)
        check_float("lr-norm", self.lr_norm, FLOAT32_MAX)
        check_float("trade", self.trade)
        check_choice("augment", self.augment, AUGMENTATIONS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("norm-layers", self.norm_layers, NORM_LAYERS)
        check_choice("on-nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        if self.n_ctx is not None:
            check_int("n-ctx", self.n_ctx, 1)
        check_float("pouf-transport", self.pouf_transport)
        check_float("pouf-im", self.pouf_im)
        check_int("upl-k", self.upl_k, 1)
        if not self.ctx_init.strip() and self.n_ctx is None:
            raise UeoError("An empty --ctx-init means a random context: give --n-ctx >= 1.")
        return self

    def replace(self, **changes) -> Recipe:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """A short hash of every field: equal recipes, equal fingerprints."""
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """The recipe stored in a run's files; unknown keys are an error, not ignored."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UeoError(f"Unknown recipe setting(s): {', '.join(unknown)}.")
        return cls(**data)


@dataclass(frozen=True)
class Runtime:
    """How to run: never changes the numbers (up to floating-point rounding across devices).

    `workers=None` picks data-loading processes from the CPUs this process may use.
    `eval_every=N` also evaluates every N epochs during training (learning curves); 0 = only
    before and after. `log="tensorboard"` also writes the learning curves as TensorBoard
    events into the run folder (ueo.eventlog); plain files are always written.
    """

    device: str = "auto"
    workers: int | None = None
    eval_batch_size: int = 256
    progress: bool = True
    compile: bool = False
    on_bad_image: str = "skip"
    channels_last: bool = True
    eval_every: int = 0
    log: str = "files"

    def validate(self) -> Runtime:
        if not isinstance(self.device, str) or not self.device.strip():
            raise UeoError("--device must be cpu, cuda, cuda:N or auto.")
        if self.workers is not None:
            check_int("workers", self.workers, 0)
        check_int("eval-batch-size", self.eval_batch_size, 1)
        check_int("eval-every", self.eval_every, 0)
        check_choice("on-bad-image", self.on_bad_image, BAD_IMAGE_POLICIES)
        check_choice("log", self.log, LOG_TARGETS)
        if self.log == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise UeoError(
                "--log tensorboard needs the tensorboard package: pip install 'ueo[tensorboard]'."
            )
        return self

    def replace(self, **changes) -> Runtime:
        return replace(self, **changes)
