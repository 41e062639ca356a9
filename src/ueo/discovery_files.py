"""Deprecated: now `ueo.discovery.files`, in `ueo discover`'s subpackage."""

from ueo.deprecated import forwarding

__getattr__ = forwarding("ueo.discovery_files", "ueo.discovery.files")
