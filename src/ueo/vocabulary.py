"""Deprecated: now `ueo.discovery.vocabulary`, in `ueo discover`'s subpackage."""

from ueo.deprecated import forwarding

__getattr__ = forwarding("ueo.vocabulary", "ueo.discovery.vocabulary")
