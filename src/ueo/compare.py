"""Deprecated: `ueo diagnose` runs `ueo.diagnose`, this module's new name."""

from ueo.deprecated import forwarding

NAMES = ("RANK_BY", "SURENESS", "compare_runs", "relative_gap", "verdict", "trust", "rank_title")
__getattr__ = forwarding(
    "ueo.compare", {**dict.fromkeys(NAMES, "ueo.diagnose"), "plain": "ueo.diagnose:to_json"}
)
