"""`ueo demo`: the offline demo, a bundled tiny CLIP on the universal-shift testbed
(ueo.demo.runner)."""

from __future__ import annotations

from ueo.checks import check_output_dir
from ueo.cli.options import use_available_cpus
from ueo.demo import BUNDLED_MODELS
from ueo.logs import setup_logging
from ueo.recipe import Runtime


def add(sub) -> None:
    p = sub.add_parser(
        "demo", help="offline demo: a bundled tiny CLIP on the universal-shift testbed"
    )
    p.add_argument("--out", default="runs/demo", help="default runs/demo")
    p.add_argument("--quick", action="store_true", help="one domain, fewer epochs")
    p.add_argument("--model", default=BUNDLED_MODELS[0], choices=BUNDLED_MODELS)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(check=check, run=run)


def check(args) -> None:
    Runtime(device=args.device, workers=0, progress=not args.quiet).validate()
    check_output_dir(args.out)


def run(args) -> int:
    if args.device == "cpu":
        # The parts' fork server starts before this process imports torch, so that its
        # imports run while this process makes its own (ueo.demo.processes).
        from ueo.demo.processes import start_part_server

        start_part_server()
    use_available_cpus()
    from ueo.demo.runner import results_table, run_demo

    runtime = Runtime(device=args.device, workers=0, progress=not args.quiet).validate()
    setup_logging(args.quiet, epochs=False)
    results = run_demo(args.out, quick=args.quick, model=args.model, runtime=runtime)
    print(results_table(results))
    print(f"\nwrote {args.out}/results.json, results.md, results.csv and plots/*.png")
    return 0
