"""ueo's step with the image tower's BatchNorm in its frozen affine form, against PyTorch's own.

The GPU profile of issue 17 lists a lead: BatchNorm in eval mode has no cuDNN backward, and
the frozen affine form (torchvision's `FrozenBatchNorm2d`, with the weight and bias trainable)
`y = x * scale + shift`, `scale = w / sqrt(var + eps)`, `shift = b - mean * scale`, might fuse.
ueo did not take it unmeasured: in eager mode the affine form is more PyTorch ops, not fewer
(the scale and shift, two elementwise ops, and their backward), and a GPU step is bound by
launching ops. This measures both on the same ResNet model, same process, alternating: ueo's
guarded training step (`ueo.training.training_step`) with each form, its seconds per step back
to back, and a `torch.profiler` count of PyTorch ops (and, on a GPU, kernels) per step; and
checks that the two forms give the same losses and tuned tensors after 3 steps (float
rounding: the affine form rounds `scale` and `shift` once, PyTorch's kernel per element).

    python benchmarks/frozen_norm.py --model RN50 --classes 65             # CPU, fp32
    python benchmarks/frozen_norm.py --model RN50 --device cuda --precision bf16 --batch 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import torch
from step_speed import (
    CLASS_LISTS,
    RECIPE,
    _device_name,
    _sync,
    back_to_back,
    equal_clips,
    natural_images,
    profile_step,
    sgd,
    ueo_step,
)

from ueo.bench.protocol import class_names
from ueo.model import UeoModel, frozen_weights_in
from ueo.objectives import mcm_score
from ueo.runtime import DTYPES, resolve_device
from ueo.training import StepGuard


def affine_forward(self: torch.nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm as one scale and one shift per channel, in the input's precision."""
    scale = self.weight * torch.rsqrt(self.running_var + self.eps)
    shift = self.bias - self.running_mean * scale
    return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)


@contextmanager
def affine_norms(model: UeoModel):
    """Every BatchNorm2d of the image tower in the frozen affine form for the block (same
    parameters and buffers: only its forward changes)."""
    norms = [m for m in model.net.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not norms:
        raise SystemExit(f"{model.clip.model_name} has no BatchNorm: use a ResNet (RN50).")
    for m in norms:
        m.forward = types.MethodType(affine_forward, m)
    try:
        yield len(norms)
    finally:
        for m in norms:
            del m.forward


def build(model_name: str, n_classes: int, device: torch.device, seed: int) -> list[UeoModel]:
    """Two equal models, built as `ueo adapt` builds one (channels_last), random weights with
    BatchNorm statistics calibrated on image-like inputs."""
    names = class_names(CLASS_LISTS[n_classes])
    clips = equal_clips(model_name, device, seed, layouts=(True, True))
    return [UeoModel(c, names).to(device) for c in clips]


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    batch = args.batch or (64 if device.type == "cuda" else 32)
    native, affine = build(args.model, args.classes, device, args.seed)
    images = natural_images(batch, native.clip.image_size, args.seed + 1).to(device)
    with torch.no_grad():
        fixed = {"weight": mcm_score(native(images))}
    opts = {"native": sgd(native, RECIPE), "affine": sgd(affine, RECIPE)}
    guards = {k: StepGuard(o, "stop") for k, o in opts.items()}
    models = {"native": native, "affine": affine}
    recipe = RECIPE.replace(precision=args.precision)
    dtype = DTYPES[args.precision]

    def step(name: str, r=RECIPE) -> None:
        ueo_step(models[name], images, fixed, opts[name], r, guards[name])

    with affine_norms(affine) as n_norms:
        for _ in range(3):  # fp32 equality: losses at each step, tuned tensors after 3
            step("native")
            step("affine")
        losses = {k: [v.loss for v in g.read()] for k, g in guards.items()}
        states = {k: m.adapter_state() for k, m in models.items()}
        param_diff = max(
            float((states["native"][k] - states["affine"][k]).abs().max()) for k in states["native"]
        )
        loss_diff = max(abs(a - b) for a, b in zip(losses["native"], losses["affine"], strict=True))
        seconds: dict[str, list[float]] = {"native": [], "affine": []}
        profiles = {}
        with frozen_weights_in(native, dtype), frozen_weights_in(affine, dtype):
            for _ in range(args.repeats):  # alternate, so that noise hits both alike
                for name in seconds:
                    seconds[name].append(
                        back_to_back(lambda n=name: step(n, recipe), device, args.steps)
                    )
            for name in seconds:
                prof = profile_step(
                    lambda n=name: step(n, recipe),
                    device,
                    Path(args.profile) / f"{args.model}-{args.classes}-{args.precision}-{name}.txt",
                )
                profiles[name] = {k: v for k, v in prof.items() if k != "table"}
        for g in guards.values():
            g.read()
        _sync(device)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "model": args.model,
        "classes": args.classes,
        "batch": batch,
        "precision": args.precision,
        "device": _device_name(device),
        "torch": torch.__version__,
        "batchnorm_layers": n_norms,
        "native_s_per_step": round(median["native"], 4),
        "affine_s_per_step": round(median["affine"], 4),
        "affine_vs_native": round(median["native"] / median["affine"], 3),
        "profile_per_step": profiles,
        "max_abs_loss_diff_3_steps_fp32": loss_diff,
        "max_abs_param_diff_after_3_steps_fp32": param_diff,
        "max_abs_param": max(float(v.abs().max()) for v in states["native"].values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="RN50", help="a ResNet open_clip model (random weights)")
    p.add_argument("--classes", type=int, default=65, choices=sorted(CLASS_LISTS))
    p.add_argument("--batch", type=int, default=None, help="default 32 on CPU, 64 on GPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=5, help="steps per timing, back to back")
    p.add_argument("--repeats", type=int, default=3, help="timings per form, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="runs/frozen_norm", help="folder for profiler tables")
    p.add_argument("--json", action="store_true", help="print the JSON record only")
    args = p.parse_args(argv)
    rec = run(args)
    if args.json:
        print(json.dumps(rec), flush=True)
    else:
        prof = rec["profile_per_step"]
        print(
            f"{rec['model']} {rec['classes']} classes, batch {rec['batch']}, {rec['precision']}, "
            f"{rec['device']}, {rec['batchnorm_layers']} BatchNorm layers: native "
            f"{rec['native_s_per_step']:.4f} s/step, affine {rec['affine_s_per_step']:.4f} s/step "
            f"(affine {rec['affine_vs_native']:.2f}x native); aten ops/step "
            f"{prof['native']['aten_ops_per_step']} vs {prof['affine']['aten_ops_per_step']}, "
            f"kernels/step {prof['native']['kernels_per_step']} vs "
            f"{prof['affine']['kernels_per_step']}; fp32 |dloss| "
            f"{rec['max_abs_loss_diff_3_steps_fp32']:.1e}, |dparam| "
            f"{rec['max_abs_param_diff_after_3_steps_fp32']:.1e} (params up to "
            f"{rec['max_abs_param']:.2f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
