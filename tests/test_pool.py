"""The crash-surviving process pool (components.pool), on plain numbers: the pool alone, apart
from the images it was made for (test_preprocess.py runs it with the step's own worker)."""

from __future__ import annotations

import logging
import os
import time

import pytest

from components import pool

BOOM = 13


def _square_or_die(items: list[int]) -> list[int]:
    """Module level: the spawned workers import it. Item BOOM kills its process, as a decoder
    bug would (os.abort: no exception, no cleanup)."""
    if BOOM in items:
        os.abort()
    return [item * item for item in items]


def _nothing() -> None:
    pass


def test_results_come_back_in_input_order_from_several_processes():
    chunks = [list(range(start, start + 3)) for start in range(0, 12, 3)]
    assert list(pool.map_chunks(_square_or_die, chunks, 2, _nothing, (), crashed=lambda item: None)) == [
        item * item for item in range(12)
    ]


def test_an_item_that_kills_its_process_is_the_only_one_lost_and_the_run_goes_on():
    """multiprocessing.Pool would wait forever for a task whose process died. The chunks that
    were in flight are redone one item per task: only the culprit gets `crashed`'s result."""
    chunks = [list(range(start, start + 4)) for start in range(0, 40, 4)]
    results = list(
        pool.map_chunks(_square_or_die, chunks, 2, _nothing, (), crashed=lambda item: f"crashed on {item}")
    )
    assert results == [f"crashed on {item}" if item == BOOM else item * item for item in range(40)]


HANG = 7


def _square_or_hang(items: list[int]) -> list[int]:
    """Item HANG never finishes, as a decoder stuck in a loop would."""
    if HANG in items:
        time.sleep(3600)
    return [item * item for item in items]


def _cannot_start() -> None:
    import a_library_this_environment_lacks  # noqa: F401


def test_an_item_that_never_finishes_is_timed_out_and_its_worker_replaced(caplog):
    """No wait without end: the chunk past its limit has its workers killed, the chunks in
    flight are redone one item at a time, and only the stuck item is given up; the wait is
    logged while nothing finishes."""
    caplog.set_level(logging.INFO, logger="components.pool")
    limits = pool.Limits(item_seconds=1.0, start_seconds=20.0, heartbeat_seconds=0.5)
    chunks = [list(range(start, start + 3)) for start in range(0, 12, 3)]
    started = time.monotonic()
    results = list(
        pool.map_chunks(
            _square_or_hang,
            chunks,
            2,
            _nothing,
            (),
            crashed=lambda item: f"crashed on {item}",
            timed_out=lambda item: f"timed out on {item}",
            limits=limits,
        )
    )
    assert results == [f"timed out on {item}" if item == HANG else item * item for item in range(12)]
    assert time.monotonic() - started < 120
    assert "ran past its time limit" in caplog.text
    assert "still working" in caplog.text


def test_a_worker_that_cannot_start_stops_the_run_with_its_cause():
    """Not blamed on the items: every item redone in a fresh process and "crashed" would hide
    that a library is missing."""
    chunks = [[item] for item in range(40)]
    started = time.monotonic()
    with pytest.raises(pool.WorkerStartError, match="ModuleNotFoundError: No module named 'a_library"):
        list(pool.map_chunks(_square_or_die, chunks, 2, _cannot_start, (), crashed=lambda item: None))
    assert time.monotonic() - started < 60


def test_the_cpu_budget_is_the_cgroup_quota_not_the_node_s_cores(tmp_path):
    cores = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert pool.cpu_budget(str(tmp_path)) == cores
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # a pod limited to half a CPU
    assert pool.cpu_budget(str(tmp_path)) == 0.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert pool.cpu_budget(str(v1)) == min(cores, 1.5)
    assert pool.cpu_budget(str(tmp_path / "none")) == cores  # no cgroup files: the affinity mask


def test_the_memory_budget_is_the_cgroup_limit(tmp_path):
    assert pool.memory_budget(str(tmp_path)) is None
    (tmp_path / "memory.max").write_text("max\n")
    assert pool.memory_budget(str(tmp_path)) is None
    (tmp_path / "memory.max").write_text(f"{8 * 2**30}\n")
    assert pool.memory_budget(str(tmp_path)) == 8 * 2**30
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert pool.memory_budget(str(tmp_path / "v1")) is None
