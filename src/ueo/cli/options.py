"""The options every command shares (the recipe, the runtime, the model, the data) and the
small readers of their values; torch-free, as the whole parser and its checks are."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ueo.bench.protocol import DATASETS, dataset_info
from ueo.errors import UeoError
from ueo.launch import check_launch_device, launch_from_env
from ueo.methods import method_names
from ueo.recipe import (
    AUGMENTATIONS,
    BAD_IMAGE_POLICIES,
    LOG_TARGETS,
    NONFINITE_POLICIES,
    NORM_LAYERS,
    PRECISIONS,
    Recipe,
    Runtime,
)

# The recipe's options, declared once for `adapt` and `bench`: field -> (type, help, choices).
RECIPE_OPTIONS: dict[str, tuple] = {
    "method": (str, "training method", None),
    "epochs": (int, "passes over the unlabeled set", None),
    "batch_size": (int, "training batch size", None),
    "lr_prompt": (float, "prompt-context learning rate; 0 freezes it", None),
    "lr_norm": (float, "norm-affine learning rate; 0 freezes them", None),
    "trade": (float, "lambda, weight of the marginal-entropy term", None),
    "seed": (int, "random seed", None),
    "augment": (str, "'none' trains with the test transform (deterministic)", AUGMENTATIONS),
    "precision": (str, "autocast precision; parameters and loss stay fp32", PRECISIONS),
    "norm_layers": (
        str,
        "image-tower norm layers tuned: the reference script's set, or all of them",
        NORM_LAYERS,
    ),
    "n_ctx": (int, "context tokens (default: length of --ctx-init)", None),
    "ctx_init": (str, "context initialisation ('' = random, needs --n-ctx)", None),
    "pouf_transport": (float, "pouf: weight of the conditional-transport term", None),
    "pouf_im": (float, "pouf: weight of the information-maximisation term", None),
    "upl_k": (int, "upl: pseudo-labelled images kept per predicted class", None),
    "on_nonfinite": (
        str,
        "a non-finite loss, gradient or parameter: stop the run, or skip the step",
        NONFINITE_POLICIES,
    ),
}


BENCH_GRID_FIELDS = ("method", "seed")  # bench takes lists of these: --methods, --seeds


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_recipe_args(
    p: argparse.ArgumentParser, skip: tuple[str, ...] = (), helps: dict[str, str] | None = None
) -> None:
    """The recipe's options; `helps` replaces the help of some (a default that differs)."""
    defaults = Recipe()
    group = p.add_argument_group("recipe (what determines the numbers)")
    for name, (kind, text, choices) in RECIPE_OPTIONS.items():
        if name in skip:
            continue
        if name == "method":
            choices = method_names()
        default = getattr(defaults, name)
        group.add_argument(
            flag(name),
            dest=name,
            type=kind,
            choices=choices,
            default=argparse.SUPPRESS,
            help=(helps or {}).get(name)
            or (f"{text} (default {default!r})" if default is not None else text),
        )


def add_runtime_args(p: argparse.ArgumentParser, training: bool = False) -> None:
    group = p.add_argument_group("runtime (how to run; never changes the numbers)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    group.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data-loading processes (default: from the CPUs this process may use)",
    )
    group.add_argument(
        "--eval-batch-size", type=int, default=256, help="inference batch (default 256)"
    )
    group.add_argument(
        "--on-bad-image",
        default="skip",
        choices=BAD_IMAGE_POLICIES,
        help="unreadable images: skip with a warning (default) or stop",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    if training:
        group.add_argument(
            "--compile", action="store_true", help="torch.compile the forward pass (both towers)"
        )
        group.add_argument(
            "--eval-every",
            type=int,
            default=0,
            help="also evaluate every N epochs, for learning curves (default 0: before and after)",
        )
        group.add_argument(
            "--log",
            default="files",
            choices=LOG_TARGETS,
            help="files (default: metrics.json, log.txt) or also TensorBoard events of the curves",
        )


PRETRAINED_HELP = (
    "open_clip tag (openai, laion2b_s34b_b79k, ...), a local checkpoint file, "
    "'bundled' (ueo's tiny models) or 'none' (random weights, tests only)"
)


def add_model_args(
    p: argparse.ArgumentParser, required: bool = True, pretrained_help: str | None = None
) -> None:
    p.add_argument(
        "--model",
        required=required,
        help="open_clip architecture, e.g. RN50, ViT-B/16, ueo-tiny-rn",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help=pretrained_help or f"{PRETRAINED_HELP}. Default: openai",
    )


DATA_HELP = (
    "image folder (root/<class>/<img>), image list (one 'path label' or one path per line), "
    "- (the list on standard input), a folder of loose images or one image file"
)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """`--data`, the image set of every command (`--images`: predict's former name for it),
    where an image list's paths are rooted, and `--unlabeled`."""
    p.add_argument(
        "--data",
        "--images",
        required=True,
        dest="data",
        metavar="DATA",
        help=f"{DATA_HELP} (--images: the same option, its former name in predict)",
    )
    p.add_argument("--data-root", default=None, help="root for relative paths of an image list")
    p.add_argument(
        "--unlabeled",
        action="store_true",
        help="read --data without labels: every image under the folder, at any depth, in sorted "
        "order, whatever its subfolders are called (a list's labels are dropped)",
    )


def add_dataset_arg(p: argparse.ArgumentParser) -> None:
    """A paper benchmark, named as an option (`--dataset`, as `ueo bench` does) or positionally."""
    p.add_argument("dataset", nargs="?", default=None, help=", ".join(DATASETS))
    p.add_argument(
        "--dataset",
        dest="dataset_option",
        metavar="NAME",
        default=None,
        help="the same as the positional DATASET",
    )


def recipe_settings(args: argparse.Namespace) -> dict:
    """The recipe options given on the command line (the others keep their defaults)."""
    return {f.name: getattr(args, f.name) for f in fields(Recipe) if hasattr(args, f.name)}


def runtime_of(args: argparse.Namespace) -> Runtime:
    """The runtime options, checked; under torchrun, a device every process can take."""
    check_launch_device(launch_from_env(), args.device)
    return Runtime(
        device=args.device,
        workers=args.workers,
        eval_batch_size=args.eval_batch_size,
        progress=not args.quiet,
        compile=getattr(args, "compile", False),
        eval_every=getattr(args, "eval_every", 0),
        log=getattr(args, "log", "files"),
        on_bad_image=args.on_bad_image,
    ).validate()


def main_process() -> bool:
    """Under torchrun, only rank 0 prints results (every process computes them)."""
    return launch_from_env().rank == 0


def use_available_cpus() -> None:
    """Import torch, with no more intra-op threads than the CPUs this process may use."""
    from ueo.runtime import use_available_cpus

    use_available_cpus()


def dataset_of(args) -> str:
    """The dataset of `prepare` / `protocol`, given positionally or as --dataset (not both
    different); its name is checked."""
    given = [d for d in (args.dataset, args.dataset_option) if d]
    if not given:
        raise UeoError(f"Name the dataset (--dataset NAME): one of {', '.join(DATASETS)}.")
    if len(given) == 2 and dataset_info(given[0]) != dataset_info(given[1]):
        raise UeoError(f"Two datasets given ({given[0]} and {given[1]}): give one.")
    return dataset_info(given[0]).name


def comma_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None
