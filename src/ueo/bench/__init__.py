"""The benchmark harness: the paper's protocol, list preparation, sweeps and their reports.

Built only on the ueo core; `ueo bench` is `ueo.bench.jobs` behind a command line.
"""
