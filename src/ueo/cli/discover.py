"""`ueo discover`: the images an adapted model rejects, grouped and named
(ueo.jobs.discover_job)."""

from __future__ import annotations

from ueo.checks import check_data, check_input_path, check_output_dir, check_threshold
from ueo.cli.options import add_data_args, add_runtime_args, runtime_of, use_available_cpus
from ueo.discovery.settings import DiscoverSettings
from ueo.logs import setup_logging


def add(sub) -> None:
    p = sub.add_parser(
        "discover", help="group and name the images an adapted model rejects as unknown"
    )
    p.add_argument("--adapter", required=True, help="adapter.safetensors (or its run directory)")
    p.add_argument("--pretrained", default=None, help="override the base weights in the adapter")
    add_data_args(p)
    p.add_argument(
        "--vocabulary",
        default=None,
        help="candidate names, one per line (default: WordNet's nouns, Debian's wordnet-base)",
    )
    p.add_argument(
        "--out", required=True, help="folder for clusters.csv, clusters.md, sheets/, discover.json"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="MCM threshold in [0, 1] below which an image is unknown (default: the adapter's)",
    )
    p.add_argument(
        "--clusters", type=int, default=None, help="number of clusters (default: chosen)"
    )
    p.add_argument(
        "--k-select",
        default="silhouette",
        choices=("silhouette", "gcd"),
        help="how the number of clusters is chosen (default silhouette)",
    )
    p.add_argument("--max-clusters", type=int, default=15, help="largest number tried (default 15)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    add_runtime_args(p)
    p.set_defaults(check=check, run=run)


def discover_settings(args) -> DiscoverSettings:
    return DiscoverSettings(args.clusters, args.k_select, args.max_clusters, args.seed).validate()


def check(args) -> None:
    runtime_of(args)
    discover_settings(args)
    check_threshold(args.threshold)
    check_output_dir(args.out)
    check_input_path(args.adapter, "Adapter file")
    check_data(args.data)
    if args.vocabulary:
        check_input_path(args.vocabulary, "Vocabulary file")


def run(args) -> int:
    use_available_cpus()
    from ueo.discovery.files import discovery_table
    from ueo.jobs import discover_job

    settings = discover_settings(args)
    runtime = runtime_of(args)
    setup_logging(args.quiet)
    found, _ = discover_job(
        args.adapter,
        args.data,
        args.out,
        vocabulary=args.vocabulary,
        pretrained=args.pretrained,
        threshold=args.threshold,
        settings=settings,
        runtime=runtime,
        data_root=args.data_root,
        unlabeled=args.unlabeled,
    )
    print(discovery_table(found))
    print(f"\nwrote {args.out}/clusters.csv, clusters.md, discover.json and sheets/*.png")
    return 0
