"""Workers planned from the CPUs a container really gets (cgroup quota), not the host's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.cpus import available_cpus, cgroup_cpu_limit


def _affinity() -> int:
    return len(os.sched_getaffinity(0))


def _proc(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "proc-cgroup"
    p.write_text(text)
    return p


def test_v2_quota_at_the_root_caps_workers(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cpu.max").write_text("50000 100000\n")  # docker run --cpus 0.5
    proc = _proc(tmp_path, "0::/\n")
    assert cgroup_cpu_limit(root, proc) == 0.5
    assert available_cpus(root, proc) == 1


def test_v2_quota_on_an_ancestor_of_the_own_cgroup(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "system.slice" / "mailgate.service").mkdir(parents=True)
    (root / "system.slice" / "cpu.max").write_text("150000 100000\n")
    (root / "system.slice" / "mailgate.service" / "cpu.max").write_text("max 100000\n")
    proc = _proc(tmp_path, "0::/system.slice/mailgate.service\n")
    assert cgroup_cpu_limit(root, proc) == 1.5
    assert available_cpus(root, proc) == min(_affinity(), 2)


def test_v1_cfs_quota(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "cpu" / "docker" / "abc").mkdir(parents=True)
    (root / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("100000\n")
    (root / "cpu" / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    proc = _proc(tmp_path, "5:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n")
    (root / "cpu,cpuacct").symlink_to(root / "cpu")
    assert cgroup_cpu_limit(root, proc) == 1.0
    assert available_cpus(root, proc) == 1


@pytest.mark.parametrize("text", ["max 100000\n", "garbage\n", ""])
def test_no_quota_means_the_affinity_count(tmp_path: Path, text: str) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cpu.max").write_text(text)
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    proc = _proc(tmp_path, "0::/\n4:cpu:/\n")
    assert cgroup_cpu_limit(root, proc) is None
    assert available_cpus(root, proc) == _affinity()
