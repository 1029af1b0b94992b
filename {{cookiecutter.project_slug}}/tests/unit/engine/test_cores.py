"""Thread pools are sized by the cores this process may use, a container's CPU quota included."""

import os

import pytest

from {{ cookiecutter.package_name }}.engine.cores import (
    available_cores,
    default_threads,
)

VISIBLE = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("cpu_max", "cores"),
    [
        ("max 100000\n", VISIBLE),  # no quota
        ("100000 100000\n", 1),  # --cpus 1
        ("50000 100000\n", 1),  # half a CPU still gets one thread
        (f"{VISIBLE * 100000 * 4} 100000\n", VISIBLE),  # a quota over the affinity
        ("garbage\n", VISIBLE),
        (None, VISIBLE),  # no cgroup v2 file
    ],
)
def test_the_cgroup_quota_caps_the_visible_cores(tmp_path, cpu_max, cores):
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    assert available_cores(path) == cores


@pytest.mark.parametrize(
    ("omp", "threads"),
    [(None, 4), ("1", 1), ("3", 3), ("16", 4), ("0", 4), ("4,2", 4), ("many", 4), ("-1", 4)],
)
def test_omp_num_threads_asks_for_fewer_threads_never_more(tmp_path, monkeypatch, omp, threads):
    path = tmp_path / "cpu.max"
    path.write_text("400000 100000\n")  # 4 CPUs' worth, on a machine that shows more or fewer
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if omp is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert default_threads(path) == min(threads, available_cores(path))
