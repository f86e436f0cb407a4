"""How many cores this process may use: what server.workers = 0 ("auto") means.

The CPU affinity mask (taskset, systemd CPUAffinity=, docker --cpuset-cpus),
capped by a cgroup v2 CPU quota on our cgroup or any parent (docker --cpus,
Kubernetes CPU limits, systemd CPUQuota=): a container limited to two CPUs
on a 64-core host must not start 64 workers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus() -> int:
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest `cpu.max` quota/period from our cgroup up to the root, in
    CPUs; None when there is none (or no cgroup v2 to read)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        return None
    limit: float | None = None
    here = root / path.lstrip("/")
    while True:
        try:
            quota, period = (here / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            quota, period = "max", "1"
        if quota != "max" and period.isdigit() and quota.isdigit() and int(period) > 0:
            cpus = int(quota) / int(period)
            limit = cpus if limit is None else min(limit, cpus)
        if here == root or root not in here.parents:
            return limit
        here = here.parent
