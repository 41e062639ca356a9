"""The CPUs a process may use: affinity capped by a cgroup quota (v2 `cpu.max` or v1 cfs)."""

import os

import pytest

from ueo import cpus


@pytest.mark.parametrize(
    ("text", "expected"),
    [("max 100000", None), ("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1)],
)
def test_cgroup_v2_quota_rounds_up(tmp_path, text, expected):
    (tmp_path / "cpu.max").write_text(text + "\n")
    assert cpus.cgroup_quota(tmp_path) == expected


@pytest.mark.parametrize(("quota", "expected"), [("-1", None), ("300000", 3), ("100", 1)])
def test_cgroup_v1_quota(tmp_path, quota, expected):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(quota)
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cpus.cgroup_quota(tmp_path) == expected


def test_no_cgroup_files_or_garbage_mean_no_quota(tmp_path):
    assert cpus.cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("lots 100000")
    assert cpus.cgroup_quota(tmp_path) is None


def test_the_quota_caps_the_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: 2)
    assert cpus.available_cpus() == 2
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: None)
    assert cpus.available_cpus() == 4
