"""How each command's time and memory grow with the number of images, 5,000 to 500,000.

N small images (32 px PNGs, as the bundled tiny models see them) are made once and kept under
`--cache`: `images/<class>/<block>/<n>.png`, 10 folders of the testbed's known classes and 2
of classes the model does not know, 1,000 images per block folder. Then, for each N, each
command runs in a fresh process (`--child`), through the job the command line calls:

- predict:  `ueo predict --data images --unlabeled` (every image under the tree, no labels);
- eval:     `ueo eval --data images` (the labelled class-folder tree);
- adapt:    `ueo adapt --data images --unlabeled --epochs 1` (its `timings_s`);
- discover: `ueo discover --data images --unlabeled` (a small vocabulary file);
- bench:    `ueo bench --dry-run` over DomainNet-shaped lists of the N images (6 domains,
            train and test lists, 345 classes), what `--dry-run` reads and digests.

predict, eval and discover use an adapter of `ueo-tiny-rn` adapted for one epoch on 500 of
the images (made once, in the cache). Each child samples its memory (/proc, every 50 ms): the
peak of its resident memory; of the private memory of it and its loader workers (Python
objects and arrays; a page a worker shares copy-on-write with its parent counted once); and of
their shared memory (the decoded-image store of `adapt`, bounded by its budget). `fixed` is
what does not depend on N: importing ueo and loading the model; everything else (listing,
digests, passes, writing) is the per-image part, and its seconds per 1,000 images at N against
the smallest N is the growth (1.00 = linear).

    python benchmarks/scaling.py --sizes 5000,50000            # about 6 min here
    python benchmarks/scaling.py --sizes 5000,50000,500000     # about an hour here
    python benchmarks/scaling.py --commands predict,eval --sizes 5000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

COMMANDS = ("predict", "eval", "adapt", "discover", "bench")
MODEL, PRETRAINED = "ueo-tiny-rn", "bundled"
UNKNOWN = ("asteroid", "bicycle")  # folders of classes the model does not know
BLOCK = 1000  # images per block folder
SIZE = 32  # pixels
DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ueo-scaling"


def known_classes() -> list[str]:
    from ueo.demo.testbed import CLASS_NAMES, KNOWN

    return list(CLASS_NAMES[:KNOWN])


# --- the images, made once ------------------------------------------------------------------


def _write_block(args: tuple[str, int, int, int]) -> None:
    """Images `start`..`stop` - 1 of class folder `folder`: a class colour, a bar, noise."""
    from PIL import Image

    folder, start, stop, shade = args
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for n in range(start, stop):
        img = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
        img[:, :, shade % 3] += np.uint8(80 + 10 * (shade // 3))
        row = int(rng.integers(4, SIZE - 8))
        img[row : row + 4, :] = 230
        Image.fromarray(img).save(out / f"{n:07d}.png", compress_level=1)


def build(cache: Path, n: int, classes: list[str]) -> Path:
    """`cache/n<N>/images`, made once (a `complete` file marks a finished tree)."""
    root = cache / f"n{n}"
    images = root / "images"
    if (root / "complete").is_file():
        return images
    folders = [*classes, *UNKNOWN]
    per_class = -(-n // len(folders))
    jobs = []
    for c, name in enumerate(folders):
        first, last = c * per_class, min(n, (c + 1) * per_class)
        for start in range(first, last, BLOCK):
            block = images / name.replace(" ", "_") / f"{(start - first) // BLOCK:04d}"
            jobs.append((str(block), start, min(start + BLOCK, last), c))
    t0 = time.perf_counter()
    print(f"making {n} images under {images} ...", file=sys.stderr, flush=True)
    with ProcessPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        list(pool.map(_write_block, jobs, chunksize=4))
    (root / "complete").write_text(f"{n} images in {time.perf_counter() - t0:.0f} s\n")
    return images


def bench_lists(root: Path, images: Path) -> Path:
    """DomainNet-shaped lists over the images: each domain a sixth of them, 7 in 10 in its
    train list, labels drawn over the 345 classes."""
    lists = root / "domainnet-lists"
    if (lists / "complete").is_file():
        return lists
    lists.mkdir(exist_ok=True)
    paths = sorted(str(p.relative_to(images)) for p in images.rglob("*.png"))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 345, len(paths))
    for d, part in zip(DOMAINS, np.array_split(np.arange(len(paths)), len(DOMAINS)), strict=True):
        cut = int(0.7 * len(part))
        for name, rows in (("train", part[:cut]), ("test", part[cut:])):
            text = "".join(f"{paths[i]} {labels[i]}\n" for i in rows)
            (lists / f"{d}_{name}.txt").write_text(text)
    (lists / "complete").write_text("")
    return lists


def make_adapter(cache: Path, classes: list[str], n: int = 5000) -> Path:
    """One adapter for predict, eval and discover: one epoch on every tenth of N images."""
    run = cache / "adapter"
    if (run / "adapter.safetensors").is_file():
        return run
    from ueo.jobs import adapt_job
    from ueo.recipe import Recipe, Runtime

    images = build(cache, n, classes)
    sample = cache / "adapter-images.txt"
    paths = sorted(images.rglob("*.png"))[::10]
    sample.write_text("".join(f"{p}\n" for p in paths))
    adapt_job(
        run,
        model=MODEL,
        pretrained=PRETRAINED,
        data=str(sample),
        classes=classes,
        recipe=Recipe(epochs=1, batch_size=32),
        runtime=Runtime(device="cpu", progress=False),
        overwrite=True,
    )
    return run


# --- one command in one process -------------------------------------------------------------


class MemorySampler:
    """Peaks, sampled from /proc every `every` seconds, of this process's resident memory, of
    the private memory of it and its loader workers (the sum of their `Pss_Anon`: pages a
    worker shares copy-on-write with its parent count once), and of their shared memory (the
    decoded-image store, `Pss_Shmem`)."""

    def __init__(self, every: float = 0.05):
        self.every = every
        self.peak_rss = self.peak_private = self.peak_shared = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        me = os.getpid()
        rss = _fields(f"/proc/{me}/status", ("VmRSS",)).get("VmRSS", 0)
        private = shared = 0
        for pid in (me, *_children(me)):
            pss = _fields(f"/proc/{pid}/smaps_rollup", ("Pss_Anon", "Pss_Shmem"))
            private += pss.get("Pss_Anon", 0)
            shared += pss.get("Pss_Shmem", 0)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_private = max(self.peak_private, private)
        self.peak_shared = max(self.peak_shared, shared)


def _fields(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """`key: value kB` lines of a /proc file, in bytes; none if the process has ended."""
    values = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in keys:
                    values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def child(command: str, n: int, cache: Path, work: Path) -> dict:
    """Run `command` on the N images in this process; its timings and memory."""
    t0 = time.perf_counter()
    with MemorySampler() as memory:
        import ueo.jobs
        from ueo.recipe import Recipe, Runtime

        imported = time.perf_counter() - t0
        classes = known_classes()
        images = str(cache / f"n{n}" / "images")
        adapter = str(cache / "adapter")
        runtime = Runtime(device="cpu", progress=False)
        out = work / f"{command}-{n}"
        if command == "predict":
            record = ueo.jobs.predict_job(
                adapter, images, out.with_suffix(".csv"), runtime=runtime, unlabeled=True
            )
            timings = record["timings_s"]
        elif command == "eval":
            timings = ueo.jobs.eval_job(images, adapter=adapter, runtime=runtime)["timings_s"]
        elif command == "adapt":
            record = ueo.jobs.adapt_job(
                out,
                model=MODEL,
                pretrained=PRETRAINED,
                data=images,
                classes=classes,
                recipe=Recipe(epochs=1),
                runtime=runtime,
                unlabeled=True,
                overwrite=True,
            )
            timings = record["timings_s"]
        elif command == "discover":
            vocabulary = work / "vocabulary.txt"
            vocabulary.write_text("".join(f"thing {i}\n" for i in range(200)))
            _, record = ueo.jobs.discover_job(
                adapter, images, out, vocabulary=vocabulary, runtime=runtime, unlabeled=True
            )
            timings = record["timings_s"]
        else:
            timings = _bench_dry_run(cache, n, out)
    total = time.perf_counter() - t0
    fixed = imported + timings.get("model", 0.0)
    return {
        "command": command,
        "images": n,
        "total_s": round(total, 3),
        "fixed_s": round(fixed, 3),
        "listing_s": timings.get("listing"),
        "per_image_part_s": round(total - fixed, 3),
        "timings_s": {"import": round(imported, 3), **timings},
        "peak_rss_mb": round(memory.peak_rss / 2**20, 1),
        "peak_private_mb": round(memory.peak_private / 2**20, 1),
        "peak_shared_mb": round(memory.peak_shared / 2**20, 1),
    }


def _bench_dry_run(cache: Path, n: int, out: Path) -> dict:
    """`ueo bench --dry-run` over DomainNet-shaped lists; its listing (the lists read) apart."""
    import contextlib
    import io

    from ueo.bench.jobs import bench_suite
    from ueo.cli import main

    root = cache / f"n{n}"
    images = root / "images"
    lists = bench_lists(root, images)
    t0 = time.perf_counter()
    bench_suite(out, dataset="domainnet", root=str(images), lists=str(lists))
    listing = time.perf_counter() - t0
    argv = ["bench", "--dataset", "domainnet", "--root", str(images), "--lists", str(lists)]
    argv += ["--out", str(out), "--model", MODEL, "--pretrained", PRETRAINED, "--dry-run"]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        if main(argv) != 0:
            raise SystemExit(f"ueo bench --dry-run failed: {argv}")
    cells = printed.getvalue().count("todo")
    return {
        "listing": round(listing, 3),
        "dry_run": round(time.perf_counter() - t0, 3),
        "cells": cells,
    }


# --- the table ------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    """One line per command and N; growth: seconds per 1,000 images against the smallest N."""
    lines = [
        "| command | images | total s | fixed s | listing s | per-image part s "
        "| s per 1,000 images | growth | peak RSS MB | peak private MB | peak shared MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {}
    for r in sorted(rows, key=lambda r: (COMMANDS.index(r["command"]), r["images"])):
        rate = 1000 * r["per_image_part_s"] / r["images"]
        base.setdefault(r["command"], rate)
        listing = "-" if r["listing_s"] is None else f"{r['listing_s']:.2f}"
        lines.append(
            f"| {r['command']} | {r['images']:,} | {r['total_s']:.1f} | {r['fixed_s']:.1f} "
            f"| {listing} | {r['per_image_part_s']:.1f} | {rate:.3f} "
            f"| {rate / base[r['command']]:.2f} | {r['peak_rss_mb']:,.0f} "
            f"| {r['peak_private_mb']:,.0f} | {r['peak_shared_mb']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="5000,50000,500000", help="comma list of N")
    p.add_argument("--commands", default=",".join(COMMANDS), help="comma list")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the images are kept")
    p.add_argument("--work", default=None, help="outputs (default: --cache/work)")
    p.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(args.cache)
    work = Path(args.work) if args.work else cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(child(args.child, args.n, cache, work)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    commands = [c.strip() for c in args.commands.split(",")]
    unknown = sorted(set(commands) - set(COMMANDS))
    if unknown:
        p.error(f"unknown command(s) {', '.join(unknown)}; choose from {', '.join(COMMANDS)}")
    classes = known_classes()
    for n in sizes:
        build(cache, n, classes)
    make_adapter(cache, classes)
    load = os.getloadavg()
    rows = []
    for n in sizes:
        for command in commands:
            run = [sys.executable, __file__, "--child", command, "--n", str(n)]
            run += ["--cache", str(cache), "--work", str(work)]
            done = subprocess.run(run, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{command} at {n} images failed (exit {done.returncode})")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(
                    f"{command:>8} {n:>8,} images: {row['total_s']:8.1f} s, "
                    f"peak RSS {row['peak_rss_mb']:,.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
    if not args.json:
        print(f"load average before: {load[0]:.2f}, after: {os.getloadavg()[0]:.2f}")
        print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
