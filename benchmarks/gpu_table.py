"""The one table of benchmarks/gpu.sh, from the files it wrote into its output folder.

python benchmarks/gpu_table.py runs/gpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def step_table(rows: list[dict]) -> list[str]:
    out = [
        "| case | ref s/step fp32 | ueo s/step fp32 | ueo vs ref fp32 | ref s/step bf16 "
        "| ueo s/step bf16 | ueo vs ref bf16 | ueo bf16 images/s | compiled images/s "
        "| share of bf16 matmul rate | kernels/step | host ms/step | device ms/step "
        "| max abs param diff (3 steps) |",
        "|" + "---|" * 14,
    ]
    for r in rows:
        prof = r.get("profile", {})
        share = r.get("fraction_of_matmul_peak")
        run = " (compiled run)" if "compile_s" in r else ""
        out.append(
            f"| {r['model']}, {r['classes']} classes{run} "
            f"| {fmt(r['reference_s_per_step'], '.4f')} "
            f"| {fmt(r['ueo_s_per_step'], '.4f')} | {fmt(r['speedup'], '.2f')}x "
            f"| {fmt(r.get('reference_s_per_step_bf16'), '.4f')} "
            f"| {fmt(r.get('ueo_s_per_step_bf16'), '.4f')} | {fmt(r.get('speedup_bf16'), '.2f')}x "
            f"| {fmt(r.get('images_per_s_ueo_bf16'))} "
            f"| {fmt(r.get('images_per_s_ueo_compiled_bf16'))} "
            f"| {fmt(share and 100 * share, '.1f')}% | {fmt(prof.get('kernels_per_step'))} "
            f"| {fmt(prof.get('wall_ms_per_step'))} | {fmt(prof.get('device_ms_per_step'))} "
            f"| {fmt(r['max_abs_param_diff_after_3_steps'], '.1e')} |"
        )
    return out


def epoch_table(rows: list[dict]) -> list[str]:
    keys = [k for k in rows[0] if k.endswith("images_per_s")] if rows else []
    out = [
        "| model | "
        + " | ".join(k.replace("_images_per_s", "") + " images/s" for k in keys)
        + " | bound by |",
        "|" + "---|" * (len(keys) + 2),
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | "
            + " | ".join(fmt(r.get(k)) for k in keys)
            + f" | {r.get('bound_by', '-')} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    lines = [(folder / "gpu.txt").read_text().strip() if (folder / "gpu.txt").is_file() else ""]
    lines += [
        "",
        "Training step (batch as run):",
        *step_table(records(folder / "step_speed.jsonl")),
    ]
    epochs = records(folder / "epoch_speed.jsonl")
    if epochs:
        lines += ["", "Whole epochs, bf16:", *epoch_table(epochs)]
    metrics = folder / "adapt" / "metrics.json"
    if metrics.is_file():
        record = json.loads(metrics.read_text())
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in record.get("timings_s", {}).items())
        lines += ["", f"ueo adapt, 2 epochs: {record['wall_time_s']:.1f} s in adapt ({phases})"]
    norm = records(folder / "frozen_norm.json")
    if norm:
        r = norm[0]
        prof = r["profile_per_step"]
        lines += [
            "",
            f"BatchNorm as a frozen affine op ({r['model']}, {r['classes']} classes, "
            f"{r['precision']}): native {r['native_s_per_step']:.4f} s/step, affine "
            f"{r['affine_s_per_step']:.4f} s/step (affine {r['affine_vs_native']:.2f}x native); "
            f"kernels/step {prof['native']['kernels_per_step']} vs "
            f"{prof['affine']['kernels_per_step']}; fp32 max abs param diff "
            f"{r['max_abs_param_diff_after_3_steps_fp32']:.1e}",
        ]
    failures = folder / "failures.txt"
    if failures.is_file() and failures.read_text().strip():
        lines += ["", "Not measured:", failures.read_text().strip()]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
