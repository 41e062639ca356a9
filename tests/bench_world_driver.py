"""`ueo` for tests of `ueo bench` over several processes (tests/test_bench_world.py), run as
a script by torchrun or directly, with what a test must see or provoke in every process:

* UEO_TEST_COUNT_DIR: each cell computed is written to rank<RANK>.txt there (in a world
  torchrun restarted, rank<RANK>.attempt<N>.txt);
* UEO_TEST_FAIL_CELL=D/S/M/seedN and UEO_TEST_FAIL_HOW: that cell fails with a user error
  (`error`), kills its process (`exit`) or hangs (`hang`);
* UEO_TEST_FINISH_TIMEOUT: the end barrier's timeout, in seconds.
"""

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import ueo.bench.sweep
import ueo.bench.world
from ueo.cli import main
from ueo.errors import UeoError

real_adapt = ueo.bench.sweep.adapt


def cell_of(staging: Path) -> str:
    """runs/D/S/M/.seedN.partial -> D/S/M/seedN."""
    return "/".join([*staging.parts[-4:-1], staging.name[1:].removesuffix(".partial")])


def adapt(*args, **kwargs):
    cell = cell_of(Path(kwargs["checkpoint_dir"]))
    if os.environ.get("UEO_TEST_COUNT_DIR"):
        name = f"rank{os.environ.get('RANK', '0')}"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        name += f".attempt{attempt}" if attempt != "0" else ""
        with open(Path(os.environ["UEO_TEST_COUNT_DIR"]) / f"{name}.txt", "a") as f:
            f.write(cell + "\n")
    if cell == os.environ.get("UEO_TEST_FAIL_CELL"):
        how = os.environ["UEO_TEST_FAIL_HOW"]
        if how == "error":
            raise UeoError("injected failure")
        if how == "exit":
            os._exit(9)
        time.sleep(600)
    return real_adapt(*args, **kwargs)


ueo.bench.sweep.adapt = adapt
if os.environ.get("UEO_TEST_FINISH_TIMEOUT"):
    ueo.bench.world.FINISH_TIMEOUT = timedelta(seconds=float(os.environ["UEO_TEST_FINISH_TIMEOUT"]))
sys.exit(main(sys.argv[1:]))
