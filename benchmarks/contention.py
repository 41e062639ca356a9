"""How ueo degrades beside other work: `ueo demo --quick` alone, then beside N busy loops;
with `--full`, also the whole `ueo demo`'s wall time (alone) against its 4-minute target.

N is the number of CPUs this process may use, so the busy loops ask for as much CPU as the
demo: a run that takes its fair share slows by about 2x. The contention ratio is the loaded
wall time over the idle one (target: at most 2.5). Both runs are measured in this one call, so
that the machine's other load hits both alike; the load average is printed with them.

    python benchmarks/contention.py                  # uses the ueo on PYTHONPATH
    python benchmarks/contention.py --busy 4 --json
    python benchmarks/contention.py --full           # and the whole demo, alone
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ueo.cpus import available_cpus


def busy_loop() -> None:
    """Spin on one core until killed."""
    while True:
        pass


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Adopt orphaned descendants. The demo's parts are children of its fork server, which
    outlives the demo by a moment and would be reaped by init: adopted and reaped here, its
    CPU time and its parts' count in RUSAGE_CHILDREN. Linux only; elsewhere nothing changes."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def reap_adopted(keep: set[int]) -> None:
    """Wait for the processes this one adopted (its children other than `keep`) to end."""
    me = os.getpid()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and int(entry.name) not in keep:
            try:
                os.waitpid(int(entry.name), 0)
            except ChildProcessError:
                pass


def demo_seconds(
    out: Path, quick: bool = True, keep: set[int] = frozenset()
) -> tuple[float, float]:
    """Wall time and CPU time (user + system, its processes together) of `ueo demo [--quick]`
    in a fresh process, imports included. CPU time that grows under load means wasted work
    (threads spinning); wall time that grows with the same CPU time means a smaller share."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "ueo.cli", "demo", "--quiet", "--out", str(out)]
    cmd += ["--quick"] if quick else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    reap_adopted(keep)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", type=int, default=None, help="busy loops (default: available CPUs)")
    p.add_argument("--full", action="store_true", help="also time the whole demo, alone")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    busy = available_cpus() if args.busy is None else args.busy
    become_subreaper()
    with tempfile.TemporaryDirectory(prefix="ueo-contention-") as tmp:
        load_before = loadavg()
        alone, alone_cpu = demo_seconds(Path(tmp) / "alone")
        loops = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(busy)]
        for proc in loops:
            proc.start()
        try:
            loaded, loaded_cpu = demo_seconds(Path(tmp) / "loaded", keep={p.pid for p in loops})
            load_during = loadavg()
        finally:
            for proc in loops:
                proc.kill()
                proc.join()
        if args.full:
            full, full_cpu = demo_seconds(Path(tmp) / "full", quick=False)
            load_after = loadavg()
    record = {
        "cpus": available_cpus(),
        "busy_loops": busy,
        "alone_s": round(alone, 1),
        "loaded_s": round(loaded, 1),
        "ratio": round(loaded / alone, 2),
        "alone_cpu_s": round(alone_cpu, 1),
        "loaded_cpu_s": round(loaded_cpu, 1),
        "loadavg_before": load_before,
        "loadavg_loaded": load_during,
    }
    if args.full:
        record.update(demo_s=round(full, 1), demo_cpu_s=round(full_cpu, 1), loadavg_demo=load_after)
    if args.json:
        print(json.dumps(record))
    else:
        print(
            f"ueo demo --quick on {record['cpus']} CPU(s): alone {alone:.1f} s, beside {busy} "
            f"busy loop(s) {loaded:.1f} s, contention ratio {record['ratio']:.2f} (target <= 2.5)"
        )
        print(f"CPU time (user + system): alone {alone_cpu:.1f} s, loaded {loaded_cpu:.1f} s")
        print(f"load average before {load_before}, while loaded {load_during}")
        if args.full:
            print(
                f"ueo demo (whole): {full:.1f} s wall (target <= 240 s), {full_cpu:.1f} s CPU; "
                f"load average after it {load_after}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
