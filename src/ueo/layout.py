"""The names of the files in a run folder, torch-free: commands that only read runs
(`ueo diagnose`) answer without importing torch."""

ADAPTER_FILE = "adapter.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.txt"
