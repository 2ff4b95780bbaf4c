"""How many CPUs this process may really use: the scheduler affinity, capped by a cgroup CPU
quota (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), which is how
a container runtime limits CPUs (``docker run --cpus 1.5``) while ``os.cpu_count()`` still says
every core of the host. ``server.workers = 0`` starts one worker per CPU counted here."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _own_cgroups(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in v1's ``cpu`` controller."""
    v2 = v1 = None
    for line in (_read(proc_cgroup) or "").splitlines():
        num, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if num == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _candidates(root: Path, own: str | None) -> list[Path]:
    """The process's own cgroup and each ancestor up to the mount point: a quota on any of
    them applies (inside a container the own path is often not visible, the root is)."""
    out = []
    if own:
        p = Path(own.lstrip("/"))
        while True:
            out.append(root / p)
            if p == Path("."):
                break
            p = p.parent
    out.append(root)
    return list(dict.fromkeys(out))


def cgroup_cpu_limit(root: Path = CGROUP_ROOT,
                     proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota (in CPUs, e.g. 1.5) over this process's cgroups, or None."""
    v2, v1 = _own_cgroups(proc_cgroup)
    limits: list[float] = []
    for d in _candidates(root, v2):
        text = _read(d / "cpu.max")
        if text:
            q, _, per = text.partition(" ")
            if q.isdigit() and per.isdigit() and int(per) > 0:  # "max 100000": no quota
                limits.append(int(q) / int(per))
    for base in (root / "cpu", root / "cpu,cpuacct"):
        for d in _candidates(base, v1):
            quota_s, period_s = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if quota_s and period_s and quota_s.lstrip("-").isdigit() and period_s.isdigit():
                quota, period = int(quota_s), int(period_s)
                if quota > 0 and period > 0:
                    limits.append(quota / period)
    return min(limits) if limits else None


def available_cpus(root: Path = CGROUP_ROOT,
                   proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """Whole CPUs to plan workers for: the affinity count, or fewer under a quota (a quota of
    1.5 CPUs gives 2: the second worker still gets half a core's work done)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)
