"""Seconds per UEO training step: the reference step against ueo's step, same process.

The reference step is the step of docs/spec.md written plainly, as the authors' script does
it: every prompt padded to the full text context and run through the whole text transformer
each step, frozen weights without gradients, fp32 (and, with --precision, under the same
autocast as ueo's). ueo's step is `ueo.training.training_step` with the registry's `ueo`
method on a model built the way `ueo adapt` builds it (exact shortcuts in `ueo.prompts`,
channels_last chosen at load time), its verdicts read by a `StepGuard` as `adapt` reads them,
and under a low precision with the frozen weights cast once (`ueo.model.frozen_weights_in`).

Both start from the same random-init model (BatchNorm statistics calibrated on natural-looking
images, so features depend on the input), tune the same groups (`configure_model` and
`collect_params` with the reference recipe's norm layers), see the same batch, and take the
same SGD steps;
steps alternate between the two so that machine noise hits both alike. Step 1 is the warm-up;
the reported time is the median of the following steps. Losses are compared at every step and
every tuned tensor after 3 steps. Under --precision, each path also runs `--steps` steps back
to back, with one wait for the device at the end, as a training run does: that is the
images/s figure (on a GPU, a step's host work then overlaps the previous step's kernels).
`--compile` adds ueo's step with `torch.compile`d features (its compile time reported apart);
`--profile DIR` writes a `torch.profiler` summary of ueo's step per case.

    python benchmarks/step_speed.py                       # every case
    python benchmarks/step_speed.py --model RN50 --classes 345 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ueo.bench.protocol import class_names
from ueo.clip import LoadedClip, calibrate_batchnorm, load_clip
from ueo.methods import get_method
from ueo.model import UeoModel, collect_params, configure_model, frozen_weights_in
from ueo.objectives import LOGIT_SCALE, mcm_score, ueo_loss
from ueo.recipe import PRECISIONS, Recipe
from ueo.runtime import DTYPES, autocast, resolve_device
from ueo.training import StepGuard, training_step

CASES = [("RN50", 345), ("RN50", 65), ("ViT-B-16", 345), ("ViT-B-16", 65)]
CLASS_LISTS = {345: "domainnet", 65: "officehome"}
LR = 1e-3
RECIPE = Recipe(lr_prompt=LR, lr_norm=LR)
UEO = get_method("ueo")


def sgd(model: UeoModel, recipe: Recipe) -> torch.optim.SGD:
    """The optimiser `adapt` trains with: plain SGD over the recipe's tuned groups."""
    configure_model(model, recipe)
    groups = collect_params(model, recipe)
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0, weight_decay=0.0)


def natural_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random colour fields with edges: image-like statistics, CLIP-normalised range."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 7, 7, generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.25 * F.interpolate(torch.rand(n, 3, 28, 28, generator=g), size=(size, size))
    x = x + 0.05 * torch.randn(n, 3, size, size, generator=g)
    mean = torch.tensor([0.481, 0.458, 0.408]).view(1, 3, 1, 1)
    std = torch.tensor([0.269, 0.261, 0.276]).view(1, 3, 1, 1)
    return ((x / 1.3).clamp(0, 1) - mean) / std


def equal_clips(
    model_name: str, device: torch.device, seed: int, layouts: tuple[bool, ...]
) -> list[LoadedClip]:
    """One random-weights network loaded once per memory layout in `layouts` (channels_last
    or not), BatchNorm statistics calibrated on image-like inputs, the same weights in each."""
    clips = []
    for channels_last in layouts:
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clips.append(load_clip(model_name, "none", device, channels_last=channels_last))
    calibrate_batchnorm(
        clips[0].model, natural_images(64, clips[0].image_size, seed + 2).to(device)
    )
    for clip in clips[1:]:
        clip.model.load_state_dict(clips[0].model.state_dict())  # copy_ keeps each layout
    return clips


class StepMemory:
    """Memory a step needs beyond the model: CUDA's peak allocation on a GPU; on the CPU,
    whose allocator keeps freed memory, the bytes autograd saves for the backward pass
    (activations, not parameters), counted once per storage."""

    def __init__(self, device: torch.device, params):
        self.device = device
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.saved: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params:
            self.saved[ptr] = t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.mib = sum(self.saved.values()) / 2**20


class KernelTime:
    """System CPU seconds and minor page faults of this process during a step: freed
    activations that the allocator hands back to the kernel are faulted in again, page by
    page, at the next step (docs/performance.md)."""

    def __enter__(self):
        self.start = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc):
        end = resource.getrusage(resource.RUSAGE_SELF)
        self.system_s = end.ru_stime - self.start.ru_stime
        self.page_faults = end.ru_minflt - self.start.ru_minflt


def reference_step(model: UeoModel, images, weights, optimizer, precision: str = "fp32") -> float:
    """The step of docs/spec.md as the authors' script computes it: full prompts, the towers
    under `precision`'s autocast (fp32: none), a host read of the loss at every step."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device, precision):
        text = model.prompt.reference_features()
        feats = F.normalize(model.net.encode_image(images), dim=-1)
    loss = ueo_loss(LOGIT_SCALE * feats.float() @ text.float().t(), weights)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def ueo_step(model: UeoModel, images, fixed, optimizer, recipe, guard, features=None):
    """ueo's step as `adapt` runs it: guarded, nothing read back (the loss stays on device)."""
    return training_step(
        model, images, fixed, optimizer, UEO, recipe, guard=guard, features=features
    )


def back_to_back(step, device: torch.device, steps: int) -> float:
    """Seconds per step over `steps` steps launched back to back, one wait at the end (after a
    warm-up step): what a training run sees."""
    step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def run_case(
    model_name: str,
    n_classes: int,
    batch: int,
    device: torch.device,
    steps: int,
    precision: str,
    seed: int = 0,
    compiled: bool = False,
    profile_dir: str | None = None,
) -> dict:
    clips = equal_clips(model_name, device, seed, layouts=(False, True))
    names = class_names(CLASS_LISTS[n_classes])
    images = natural_images(batch, clips[0].image_size, seed + 1).to(device)
    ref = UeoModel(clips[0], names, bucketing=False).to(device)
    ours = UeoModel(clips[1], names).to(device)
    opt_ref, opt_ours = sgd(ref, RECIPE), sgd(ours, RECIPE)
    with torch.no_grad():
        weights = mcm_score(ref(images))
    fixed = {"weight": weights}

    times = {"reference": [], "ueo": []}
    system = {"reference": [], "ueo": []}
    faults = {"reference": [], "ueo": []}
    losses = {"reference": [], "ueo": []}
    memory = {}
    after3 = {}
    start_state = {k: v.clone() for k, v in ours.adapter_state().items()}
    grad_norm = None
    params = [*ref.net.parameters(), *ours.net.parameters(), ref.prompt.ctx, ours.prompt.ctx]
    guard = StepGuard(opt_ours, "stop")
    for _ in range(steps):
        for name, fn in (
            ("reference", lambda: reference_step(ref, images, weights, opt_ref)),
            ("ueo", lambda: ueo_step(ours, images, fixed, opt_ours, RECIPE, guard)),
        ):
            _sync(device)
            with StepMemory(device, params) as mem, KernelTime() as kernel:
                t0 = time.perf_counter()
                out = fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
            system[name].append(kernel.system_s)
            faults[name].append(kernel.page_faults)
            memory[name] = max(memory.get(name, 0.0), mem.mib)
            if name == "reference":
                losses["reference"].append(out)
            if name == "ueo" and grad_norm is None:
                grad_norm = float(
                    torch.cat(
                        [
                            p.grad.flatten()
                            for p in [ours.prompt.ctx, *ours.norm_parameters().values()]
                        ]
                    ).norm()
                )
        if len(times["ueo"]) == 3:
            after3 = {
                "reference": {k: v.clone() for k, v in ref.adapter_state().items()},
                "ueo": {k: v.clone() for k, v in ours.adapter_state().items()},
            }
    losses["ueo"] = [v.loss for v in guard.read()]
    low_precision = {}
    if precision != "fp32":
        low = RECIPE.replace(precision=precision)
        t_ref_low = back_to_back(
            lambda: reference_step(ref, images, weights, opt_ref, precision), device, steps
        )
        with frozen_weights_in(ours, DTYPES[precision]):
            t_low = back_to_back(
                lambda: ueo_step(ours, images, fixed, opt_ours, low, guard), device, steps
            )
            low_precision = {
                f"reference_s_per_step_{precision}": round(t_ref_low, 4),
                f"ueo_s_per_step_{precision}": round(t_low, 4),
                f"speedup_{precision}": round(t_ref_low / t_low, 2),
                f"images_per_s_ueo_{precision}": round(batch / t_low, 1),
            }
            if compiled:
                features = torch.compile(partial(ours.cosines, precision=precision), dynamic=False)
                t0 = time.perf_counter()
                ueo_step(ours, images, fixed, opt_ours, low, guard, features)
                _sync(device)
                compile_s = time.perf_counter() - t0
                t_comp = back_to_back(
                    lambda: ueo_step(ours, images, fixed, opt_ours, low, guard, features),
                    device,
                    steps,
                )
                low_precision |= {
                    f"ueo_compiled_s_per_step_{precision}": round(t_comp, 4),
                    f"images_per_s_ueo_compiled_{precision}": round(batch / t_comp, 1),
                    "compile_s": round(compile_s, 1),
                }
            if profile_dir is not None:
                low_precision["profile"] = profile_step(
                    lambda: ueo_step(ours, images, fixed, opt_ours, low, guard),
                    device,
                    Path(profile_dir) / f"{model_name}-{n_classes}-{precision}.txt",
                )
            if device.type == "cuda":  # the step's FLOP rate against the card's matmul rate
                achieved = step_flops(ours, images, fixed, opt_ours, low) / t_low / 1e12
                peak = matmul_rate(device, precision)
                low_precision |= {
                    f"achieved_tflops_{precision}": round(achieved, 1),
                    "matmul_peak_tflops": round(peak, 1),
                    "fraction_of_matmul_peak": round(achieved / peak, 4),
                }
        guard.read()
    param_diff = max(
        float((after3["reference"][k] - after3["ueo"][k]).abs().max()) for k in after3["ueo"]
    )
    param_moved = max(float((after3["ueo"][k] - start_state[k]).abs().max()) for k in after3["ueo"])
    t_ref = statistics.median(times["reference"][1:])
    t_ours = statistics.median(times["ueo"][1:])
    return {
        "model": model_name,
        "classes": n_classes,
        "batch": batch,
        "device": _device_name(device),
        "threads": torch.get_num_threads(),
        "reference_s_per_step": round(t_ref, 4),
        "ueo_s_per_step": round(t_ours, 4),
        "speedup": round(t_ref / t_ours, 2),
        "images_per_s_ueo": round(batch / t_ours, 1),
        **low_precision,
        "max_abs_loss_diff_3_steps": max(
            abs(a - b) for a, b in zip(losses["reference"][:3], losses["ueo"][:3], strict=True)
        ),
        "max_abs_param_diff_after_3_steps": param_diff,
        "max_abs_param_change_after_3_steps": param_moved,
        "first_loss": losses["ueo"][0],
        "first_grad_norm": grad_norm,
        "step_memory_mib": {k: round(v, 1) for k, v in memory.items()},
        "step_memory_kind": "cuda_peak_allocated" if device.type == "cuda" else "saved_activations",
        "system_s_per_step": {k: round(statistics.median(v[1:]), 2) for k, v in system.items()},
        "page_faults_per_step": {k: int(statistics.median(v[1:])) for k, v in faults.items()},
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "steps": steps,
        "lr": LR,
    }


def step_flops(model, images, fixed, optimizer, recipe) -> float:
    """Matmul and convolution FLOPs of one step (forward and backward), as PyTorch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        training_step(model, images, fixed, optimizer, UEO, recipe)
    return float(counter.get_total_flops())


def profile_step(step, device: torch.device, path: Path, steps: int = 3) -> dict:
    """`torch.profiler` over `steps` steps: the table of ops by device (or CPU) time goes to
    `path`; returns what bounds the step: host and device time, kernels, syncs and copies."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    step()
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(events.table(sort_by=sort, row_limit=40))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = {e.key: e.count for e in events}
    return {
        "wall_ms_per_step": round(1e3 * wall, 2),
        "device_ms_per_step": round(sum(e.device_time for e in kernels) / 1e3 / steps, 2),
        "kernels_per_step": len(kernels) // steps,
        "aten_ops_per_step": sum(c for k, c in names.items() if k.startswith("aten::")) // steps,
        "copies_per_step": names.get("aten::copy_", 0) // steps,
        "syncs_per_step": sum(
            c for k, c in names.items() if "Synchronize" in k or k == "aten::item"
        )
        // steps,
        "table": str(path),
    }


def matmul_rate(device: torch.device, precision: str, n: int = 8192, reps: int = 10) -> float:
    """The card's dense matmul rate in TFLOP/s at this precision (the yardstick for a step)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _low_precision_summary(rec: dict, precision: str) -> str:
    """The autocast figures of a GPU run: images/s and the fraction of the matmul peak."""
    if f"images_per_s_ueo_{precision}" not in rec:
        return ""
    text = (
        f"; {precision}: reference {rec[f'reference_s_per_step_{precision}']:.4f} s/step, ueo "
        f"{rec[f'ueo_s_per_step_{precision}']:.4f} s/step -> {rec[f'speedup_{precision}']:.2f}x, "
        f"{rec[f'images_per_s_ueo_{precision}']} images/s"
    )
    if f"images_per_s_ueo_compiled_{precision}" in rec:
        text += (
            f", compiled {rec[f'images_per_s_ueo_compiled_{precision}']} images/s (compile "
            f"{rec['compile_s']} s)"
        )
    if "fraction_of_matmul_peak" in rec:
        text += (
            f", {rec[f'achieved_tflops_{precision}']} TFLOP/s = "
            f"{100 * rec['fraction_of_matmul_peak']:.1f}% of the card's {precision} matmul "
            f"rate ({rec['matmul_peak_tflops']} TFLOP/s)"
        )
    return text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="RN50 or ViT-B-16 (default: every case)")
    p.add_argument("--classes", type=int, default=None, choices=sorted(CLASS_LISTS))
    p.add_argument("--batch", type=int, default=None, help="default 32 on CPU, 64 on GPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=4, help="steps per path, first is warm-up (>= 4)")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=list(PRECISIONS),
        help="also time ueo's step under this autocast precision (GPU)",
    )
    p.add_argument("--compile", action="store_true", help="also time the compiled step")
    p.add_argument("--profile", default=None, help="write torch.profiler tables to this folder")
    p.add_argument("--json", action="store_true", help="print JSON lines only")
    p.add_argument("--out", default=None, help="also write the JSON records to this file")
    args = p.parse_args(argv)
    if args.steps < 4:
        p.error("--steps must be >= 4 (3 steps are compared, the first is a warm-up)")
    device = resolve_device(args.device)
    batch = args.batch or (64 if device.type == "cuda" else 32)
    cases = [
        (m, c)
        for m, c in CASES
        if (args.model is None or m == args.model.replace("/", "-"))
        and (args.classes is None or c == args.classes)
    ]
    if not cases:
        cases = [(args.model.replace("/", "-"), args.classes or 345)]
    records = []
    for model_name, n_classes in cases:
        rec = run_case(
            model_name,
            n_classes,
            batch,
            device,
            args.steps,
            args.precision,
            compiled=args.compile,
            profile_dir=args.profile,
        )
        records.append(rec)
        if args.out:
            Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            print(
                f"{rec['model']:>9} {rec['classes']:>3} classes, batch {batch}, {rec['device']}: "
                f"reference {rec['reference_s_per_step']:.3f} s/step, ueo "
                f"{rec['ueo_s_per_step']:.3f} s/step -> {rec['speedup']:.2f}x; "
                f"|dloss| {rec['max_abs_loss_diff_3_steps']:.1e}, |dparam| "
                f"{rec['max_abs_param_diff_after_3_steps']:.1e} (params moved "
                f"{rec['max_abs_param_change_after_3_steps']:.1e}); step memory MiB "
                f"{rec['step_memory_mib']}; system s/step {rec['system_s_per_step']}, page "
                f"faults/step {rec['page_faults_per_step']}; {rec['images_per_s_ueo']} images/s"
                + _low_precision_summary(rec, args.precision),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
