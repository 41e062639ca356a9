"""Deprecated: `ueo.io` shadowed the standard library's `io`. Its atomic writes and strict JSON
are `ueo.files`, the adapter file format is in `ueo.runs` with the run's other files, the path
checks are `ueo.checks`."""

from ueo.deprecated import forwarding

__getattr__ = forwarding(
    "ueo.io",
    {
        **dict.fromkeys(("atomic_write", "write_text", "write_json"), "ueo.files"),
        **dict.fromkeys(("save_adapter", "load_adapter", "tensors_sha256"), "ueo.runs"),
        **dict.fromkeys(("check_output_dir", "check_output_file"), "ueo.checks"),
        "ADAPTER_FILE": "ueo.layout",
    },
)
