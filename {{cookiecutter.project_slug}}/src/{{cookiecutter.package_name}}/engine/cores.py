"""The CPU cores this process may use: its CPU affinity, capped by its cgroup's CPU quota.

A container started with `--cpus 2` on a 64-core host still sees 64 CPUs in `os.cpu_count()`
and in its affinity; only cgroup v2's `cpu.max` ("200000 100000": 2 CPUs' worth of time per
period) says 2. Engines that start one thread per visible CPU would then run 64 threads in the
time of 2, each stalling the others at every barrier.
"""

import math
import os
from pathlib import Path

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores(cpu_max: Path = CPU_MAX) -> int:
    """The cores to size thread pools by: at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2 here, or a line this does not know
        pass
    return max(1, cores)


def default_threads(cpu_max: Path = CPU_MAX) -> int:
    """Threads for an engine told 0 (all cores): the available cores, or OMP_NUM_THREADS where
    it asks for fewer, as torch itself reads it. A process started with OMP_NUM_THREADS=1 beside
    others (a second service, a test suite) keeps to one thread: beside two busy processes on 2
    cores, the quality gate took 135 s on two OpenMP threads, which wait at every barrier for
    the one that lost its core, and 63 s on one (measured)."""
    cores = available_cores(cpu_max)
    try:
        asked = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:  # unset, or a list for nested regions
        return cores
    return min(cores, asked) if asked > 0 else cores
