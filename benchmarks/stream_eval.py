"""`ueo stream` on the offline testbed: online UEO, entropy minimisation, TDA and zero-shot
against offline UEO (the demo's cells), and how fast the stream goes against `ueo predict`.

Streams (each image answered once, by the model as it was before it saw the image):
- per domain and scenario (ODA, OPDA): the scenario's unlabeled images of the domain, the
  images the demo's offline cells adapt on, in an order shuffled with a fixed seed (the lists
  are sorted by class; a class-sorted stream is another problem, label shift over time);
- continual: the ODA unlabeled images of blur, then noise, pixelate and sketch (each
  domain's shuffled), one stream, with the domain column (no reset).
Each at every batch size of `--batches`, with the demo's learning rates (4e-3), one step per
batch. Scores are the online ACC, AUROC, H and FPR95 of the rows as they were made (their
unknown flag at the running Otsu threshold does not enter them: AUROC and FPR95 rank the MCM
scores). Offline UEO is the demo's cell (5 epochs over the same unlabeled images, then a
prediction of each): its metrics on those images (`unlabeled`) and on the test split.

Also: the running threshold against `ueo.metrics.otsu_threshold` over the same scores at
every batch (`--otsu`), and the speed: `ueo predict` (its predict phase) and online UEO at
B = 64 on the same list, alternated `--speed-repeats` times, in one process.

    python benchmarks/stream_eval.py --demo runs/demo --out runs/stream_eval
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ueo.api import load_model
from ueo.bench.plan import Cell
from ueo.demo.runner import DEMO_RECIPE, testbed_suite
from ueo.demo.testbed import build_testbed
from ueo.files import write_json, write_text
from ueo.jobs import adapt_job, predict_job
from ueo.metrics import otsu_threshold
from ueo.recipe import Recipe, Runtime
from ueo.reports import fmt
from ueo.stream.run import PREDICTIONS_FILE, prepare_folder, run_stream, stream_job
from ueo.stream.settings import StreamSettings
from ueo.stream.threshold import BINS, RunningOtsu

SCENARIOS = ("ODA", "OPDA")
ORDER_SEED = 0
METRICS = ("acc", "auroc", "h", "fpr95")


@dataclass
class Stream:
    name: str
    slug: str  # its folder
    scenario: str
    known: list[str]
    list_file: Path
    domains: list[str]


def write_list(path: Path, parts: list[tuple[str | None, object]], n_known: int) -> None:
    """A stream's list: `path label [domain]` per line, each part's images shuffled; labels
    of unknown classes written as `n_known` (read back as OOD)."""
    rng = np.random.default_rng(ORDER_SEED)
    lines = []
    for domain, images in parts:
        for i in rng.permutation(len(images)):
            label = int(images.labels[i])
            label = label if label >= 0 else n_known
            lines.append(f"{images.paths[i]} {label}" + (f" {domain}" if domain else "") + "\n")
    write_text(path, "".join(lines))


def streams(suite, out: Path, domains: list[str], limit: int | None) -> list[Stream]:
    """Every domain x scenario stream, and the continual one (when every domain is asked for)."""
    found, continual = [], []
    for domain in domains:
        for scenario in SCENARIOS:
            known, unlabeled, _ = suite.scenario_sets(suite.domain(domain), scenario)
            if limit:  # a sample of every class
                pick = np.random.default_rng(ORDER_SEED).permutation(len(unlabeled))[:limit]
                unlabeled = unlabeled.subset(np.sort(pick))
            path = out / "lists" / f"{domain}_{scenario}.txt"
            write_list(path, [(None, unlabeled)], len(known))
            name = f"{domain}/{scenario}"
            found.append(Stream(name, f"{domain}_{scenario}", scenario, known, path, [domain]))
            if scenario == "ODA":
                continual.append((domain, unlabeled))
    if len(continual) > 1:
        path = out / "lists" / "continual_ODA.txt"
        known = suite.scenario_sets(suite.domains[0], "ODA")[0]
        write_list(path, continual, len(known))
        name = "continual " + " -> ".join(d for d, _ in continual)
        domains = [d for d, _ in continual]
        found.append(Stream(name, "continual_ODA", "ODA", known, path, domains))
    return found


def run_one(model, zero, stream: Stream, method: str, batch: int, out: Path) -> dict:
    """One stream through the model from its zero-shot state; metrics.json's record."""
    model.load_adapter_state(zero)
    folder = out / "streams" / stream.slug / method / f"b{batch}"
    prepare_folder(folder, resume=False, overwrite=True)
    recipe = DEMO_RECIPE.replace(method="ueo")
    settings = StreamSettings(method=method, batch_size=batch, recipe=recipe)
    runtime = Runtime(device="cpu", progress=False)
    record = run_stream(model, str(stream.list_file), folder, settings, runtime)
    record["otsu"] = otsu_agreement(folder / PREDICTIONS_FILE)
    return record


def otsu_agreement(csv_path: Path) -> dict:
    """The running threshold of every batch, replayed from the rows' scores (what the stream
    computed: the flags must agree), against otsu_threshold over the same scores: the batches
    where the two are equal, the largest gap in bins of the 256-bin histogram, and the rows
    that the exact threshold would have flagged otherwise."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    mcm = np.array([float(r[3]) for r in rows])
    flags = np.array([r[4] == "True" for r in rows])
    batch = np.array([int(r[5]) for r in rows])
    ends = [*(np.flatnonzero(np.diff(batch)) + 1).tolist(), len(rows)]
    otsu, start = RunningOtsu(), 0
    equal, gap, differ = 0, 0.0, 0
    for end in ends:
        running = otsu.add(mcm[start:end])
        assert np.array_equal(mcm[start:end] < running, flags[start:end]), "not the stream's"
        seen = mcm[:end]
        exact = otsu_threshold(seen)
        equal += running == exact
        width = (seen.max() - seen.min()) / BINS
        gap = max(gap, abs(running - exact) / width if width else 0.0)
        differ += int(((mcm[start:end] < exact) != flags[start:end]).sum())
        start = end
    return {"batches": len(ends), "equal": int(equal), "max_gap_bins": gap, "rows": differ}


def offline(demo: Path, stream: Stream, seed: int) -> dict | None:
    """The demo's offline UEO cell(s) of the stream's domain(s): metrics on its unlabeled
    images (the stream's) and on the test split; the mean over domains for the continual one."""
    found = []
    for domain in stream.domains:
        path = Cell(domain, stream.scenario, "ueo", seed).path(demo) / "metrics.json"
        if not path.is_file():
            return None
        found.append(json.loads(path.read_text())["adapted"])
    return {
        split: {m: float(np.mean([f[split][m] for f in found])) for m in METRICS}
        for split in ("unlabeled", "test")
    }


def speed(lists: list[Path], known: list[str], out: Path, repeats: int) -> dict:
    """`ueo predict` and online UEO at B = 64 on one list of the given streams' images (their
    known classes `known`), in turns, `repeats` times each."""
    everything = out / "lists" / "speed.txt"
    write_text(everything, "".join(p.read_text() for p in lists))
    known = ",".join(known)
    runtime = Runtime(device="cpu", progress=False)
    zeroshot = out / "speed" / "zeroshot"
    adapt_job(
        zeroshot,
        model="ueo-tiny-rn",
        pretrained="bundled",
        data=str(everything),
        classes=known,
        recipe=Recipe(epochs=0),
        runtime=runtime,
        overwrite=True,
    )
    runs = {"predict": [], "stream": []}
    load = [os.getloadavg()[0]]
    for _ in range(repeats):
        done = predict_job(zeroshot, str(everything), out / "speed" / "p.csv", runtime=runtime)
        runs["predict"].append(done["images"] / done["timings_s"]["predict"])
        settings = StreamSettings(method="ueo", batch_size=64, recipe=DEMO_RECIPE)
        folder = out / "speed" / "stream"
        shutil.rmtree(folder, ignore_errors=True)
        record = stream_job(
            folder,
            model="ueo-tiny-rn",
            pretrained="bundled",
            classes=known,
            data=str(everything),
            settings=settings,
            runtime=runtime,
        )
        runs["stream"].append(record["images_per_s"])
        runs.setdefault("stream_timings_s", []).append(record["timings_s"])
    load.append(os.getloadavg()[0])
    predict, stream = np.median(runs["predict"]), np.median(runs["stream"])
    return {
        "images": done["images"],
        "predict_images_per_s": runs["predict"],
        "stream_ueo_b64_images_per_s": runs["stream"],
        "stream_timings_s": runs["stream_timings_s"],
        "ratio_of_medians": float(stream / predict),
        "load_average_1min": load,
        "threads": torch.get_num_threads(),
    }


def row(label: str, metrics: dict, extra: str = "") -> str:
    return f"{label:<24}" + "".join(f"{fmt(metrics[k]):>7}" for k in METRICS) + extra


HEAD = f"{'':24}{'ACC':>7}{'AUROC':>7}{'H':>7}{'FPR95':>7}"
TIMES = f"{'img/s':>8}{'latency ms':>15}"


def timing(r: dict) -> str:
    lat = r["latency_s"]
    return f"{r['images_per_s']:>8.0f}{1000 * lat['median']:>8.1f} {1000 * lat['p95']:>6.1f}"


def table(results: list[dict]) -> str:
    """Per stream: each method and batch size (images/s; latency per batch, median and 95th
    percentile), then offline UEO, in percent."""
    blocks = []
    for name in dict.fromkeys(r["stream"] for r in results):
        rows = [r for r in results if r["stream"] == name]
        lines = [f"{name} ({rows[0]['images']} images)", HEAD + TIMES]
        lines += [row(f"{r['method']} B={r['batch']}", r["online"], timing(r)) for r in rows]
        if rows[0]["offline"]:
            for split in ("unlabeled", "test"):
                lines.append(row(f"offline ueo ({split})", rows[0]["offline"][split]))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def mean_table(results: list[dict]) -> str:
    """Per scenario, the mean over the per-domain streams; images/s over all of them."""
    blocks = []
    for scenario in SCENARIOS:
        rows = [r for r in results if r["scenario"] == scenario and not r["continual"]]
        if not rows:
            continue
        lines = [
            f"{scenario}: mean of {len({r['stream'] for r in rows})} domains",
            HEAD + "   img/s",
        ]
        for method, batch in dict.fromkeys((r["method"], r["batch"]) for r in rows):
            chosen = [r for r in rows if (r["method"], r["batch"]) == (method, batch)]
            means = {k: np.mean([r["online"][k] for r in chosen]) for k in METRICS}
            images = sum(r["images"] for r in chosen)
            rate = images / sum(r["images"] / r["images_per_s"] for r in chosen)
            lines.append(row(f"{method} B={batch}", means, f"{rate:>8.0f}"))
        offline_rows = {r["stream"]: r["offline"] for r in rows if r["offline"]}
        for split in ("unlabeled", "test"):
            if offline_rows:
                values = offline_rows.values()
                means = {k: np.mean([o[split][k] for o in values]) for k in METRICS}
                lines.append(row(f"offline ueo ({split})", means))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def segment_table(results: list[dict]) -> str:
    """The continual stream's online H per domain segment."""
    rows = [r for r in results if r["continual"]]
    if not rows:
        return ""
    domains = [s["domain"] for s in rows[0]["segments"]]
    lines = [
        "continual stream, H per domain segment",
        f"{'':24}" + "".join(f"{d:>9}" for d in domains),
    ]
    for r in rows:
        values = "".join(f"{fmt(s['metrics']['h']):>9}" for s in r["segments"])
        lines.append(f"{r['method'] + ' B=' + str(r['batch']):<24}{values}")
    return "\n".join(lines)


def report(record: dict) -> str:
    """stream_eval.md: the tables, the threshold's agreement and the speed."""
    results = record["results"]
    parts = [mean_table(results), segment_table(results), table(results)]
    checked = [r["otsu"] for r in results]
    batches = sum(o["batches"] for o in checked)
    parts.append(
        f"running threshold vs otsu_threshold over the same scores: equal at "
        f"{sum(o['equal'] for o in checked)} of {batches} batches, largest gap "
        f"{max(o['max_gap_bins'] for o in checked):.2f} bins, "
        f"{sum(o['rows'] for o in checked)} of {sum(r['images'] for r in results)} rows "
        "flagged otherwise"
    )
    speed = record["speed"]
    if speed:
        parts.append(
            f"speed on {speed['images']} images ({speed['threads']} thread(s), load average "
            f"{speed['load_average_1min'][0]:.1f} -> {speed['load_average_1min'][1]:.1f}): "
            f"ueo predict {np.median(speed['predict_images_per_s']):.0f} images/s, online UEO "
            f"B=64 {np.median(speed['stream_ueo_b64_images_per_s']):.0f} images/s (medians of "
            f"{len(speed['predict_images_per_s'])}): ratio {speed['ratio_of_medians']:.2f}"
        )
    return "\n\n".join(p for p in parts if p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="ueo demo's --out")
    parser.add_argument("--out", type=Path, default=Path("runs/stream_eval"))
    parser.add_argument("--methods", default="zeroshot,tda,entmin,ueo")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--domains", default="blur,noise,pixelate,sketch")
    parser.add_argument("--limit", type=int, default=None, help="images per stream (tests)")
    parser.add_argument("--speed-repeats", type=int, default=3, help="0: no speed comparison")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of everything measured (default 1: the tiny model's operations "
        "are too small to share between two threads of a loaded 2-core machine)",
    )
    parser.add_argument("--json", action="store_true", help="print the record as JSON")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite stream_eval.md from its .json"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report_only:
        record = json.loads((args.out / "stream_eval.json").read_text())
        write_text(args.out / "stream_eval.md", report(record) + "\n")
        print(report(record))
        return 0
    start = time.perf_counter()
    suite = testbed_suite(build_testbed())
    found = streams(suite, args.out, args.domains.split(","), args.limit)
    models = {}
    results = []
    for stream in found:
        key = tuple(stream.known)
        if key not in models:
            model = load_model("ueo-tiny-rn", "bundled", stream.known, DEMO_RECIPE)
            models[key] = model, {k: v.clone() for k, v in model.adapter_state().items()}
        model, zero = models[key]
        off = offline(args.demo, stream, DEMO_RECIPE.seed)
        for method in args.methods.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                record = run_one(model, zero, stream, method, batch, args.out)
                online = record["online"]
                results.append(
                    {
                        "stream": stream.name,
                        "scenario": stream.scenario,
                        "continual": len(stream.domains) > 1,
                        "method": method,
                        "batch": batch,
                        "images": record["images"],
                        "online": {k: online["all"][k] for k in METRICS},
                        "segments": online["segments"],
                        "images_per_s": record["images_per_s"],
                        "latency_s": record["latency_s"],
                        "otsu": record["otsu"],
                        "offline": off,
                    }
                )
                print(f"{stream.name} {method} B={batch}: H {fmt(online['all']['h'])}", flush=True)
    record = {
        "settings": {
            "model": "ueo-tiny-rn",
            "recipe": DEMO_RECIPE.replace(method="ueo").to_dict(),
            "order_seed": ORDER_SEED,
            "limit": args.limit,
            "threads": args.threads,
        },
        "results": results,
        "speed": None,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    oda = [s for s in found if len(s.domains) == 1 and s.scenario == "ODA"]
    if args.speed_repeats and oda:
        lists = [s.list_file for s in oda]
        record["speed"] = speed(lists, oda[0].known, args.out, args.speed_repeats)
    write_json(args.out / "stream_eval.json", record)
    write_text(args.out / "stream_eval.md", report(record) + "\n")
    print(json.dumps(record) if args.json else report(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
