"""`ueo models`: the model architectures and pretrained tags ueo can load (ueo.clip)."""

from __future__ import annotations


def add(sub) -> None:
    p = sub.add_parser("models", help="list model architectures and pretrained tags")
    p.add_argument("--tags", action="store_true", help="also list pretrained tags")
    p.set_defaults(check=None, run=run)


def run(args) -> int:
    from ueo.clip import list_models

    for name, tags in list_models(args.tags):
        print(name + (f"  [{', '.join(tags)}]" if tags else ""))
    return 0
