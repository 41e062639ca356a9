"""The docs name every CLI option, so they cannot silently drift from the code."""

import argparse
from pathlib import Path

from ueo.cli import build_parser

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_cli_option_is_documented():
    text = (DOCS / "cli.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, command in sub.choices.items():
        if f"`ueo {name}" not in text:
            missing.append(f"ueo {name}")
        for action in command._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help" and f"`{option}" not in text:
                    missing.append(f"ueo {name} {option}")
    assert not missing, f"undocumented in docs/cli.md: {missing}"
