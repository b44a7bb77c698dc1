"""A process pool that survives a task killing its process, or never finishing.

Native decoders have bugs that abort the process (TF 2.21 does on some inputs) or spin. With
multiprocessing.Pool a lost task is waited for forever; here the broken pool is reported
(concurrent.futures), and a chunk that runs past its time limit has its workers killed. Either
way the chunks that were in flight are redone one item per task in a fresh process, so that
only the item that kills its process (`crashed` says what to yield for it) or outlives its
limit (`timed_out`) is lost, and every other item's result comes back, in input order.

A worker that cannot start at all (its initializer raised: a missing library, say) is not
blamed on the items: the first result raises WorkerStartError with the cause.

Processes are spawned, not forked: a fork would copy TensorFlow's threads and locks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class WorkerStartError(RuntimeError):
    """A worker process failed in its initializer; the message is its exception, in one line."""


@dataclass(frozen=True)
class Limits:
    item_seconds: float = 60.0  # the most one item may take; 0 = no limit
    start_seconds: float = 120.0  # allowed on top for a fresh worker to start (TF's import)
    heartbeat_seconds: float = 30.0  # a log line this often while nothing finishes

    def deadline(self, since: float, items: int, fresh: bool) -> float:
        """When `items` started at `since` (monotonic) are out of time; inf without a limit.
        A `fresh` worker also gets its start-up allowance."""
        if not self.item_seconds:
            return float("inf")
        return since + self.item_seconds * items + (self.start_seconds if fresh else 0.0)


# In each worker: why its initializer failed, if it did.
_START_FAILURE: list[str] = []


def _start(initializer: Callable[..., None], *initargs) -> None:
    try:
        initializer(*initargs)
    except BaseException as error:  # noqa: BLE001 - reported by every task of this worker
        _START_FAILURE.append("".join(traceback.format_exception_only(error)).strip())


def _run(work: Callable[[list[Item]], list[Result]], chunk: list[Item]) -> list[Result]:
    if _START_FAILURE:
        raise WorkerStartError(_START_FAILURE[0])
    return work(chunk)


def _pool(
    workers: int, initializer: Callable[..., None], initargs: tuple
) -> concurrent.futures.ProcessPoolExecutor:
    return concurrent.futures.ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start,
        initargs=(initializer, *initargs),
    )


def _kill(executor: concurrent.futures.ProcessPoolExecutor) -> None:
    """Stop every worker now: shutdown() alone waits for a running task, which may never end.
    (`_processes` is the executor's own table of its workers.)"""
    for process in list((executor._processes or {}).values()):
        process.kill()
    executor.shutdown(wait=True, cancel_futures=True)


class _Lost(Exception):
    """The chunks in flight were lost (a worker died, or a chunk ran out of time)."""


def _result(future: concurrent.futures.Future, deadline: float, limits: Limits, in_flight: int):
    """The future's result, waiting at most until `deadline` (monotonic; inf = no limit) and
    logging while nothing finishes. _Lost when the pool broke or the deadline passed."""
    waited_since = time.monotonic()
    while True:
        timeout = min(limits.heartbeat_seconds, max(deadline - time.monotonic(), 0.0))
        done, _ = concurrent.futures.wait([future], timeout=timeout)
        if done:
            try:
                return future.result()
            except concurrent.futures.process.BrokenProcessPool:
                raise _Lost("a worker process died") from None
        if time.monotonic() >= deadline:
            raise _Lost("a chunk ran past its time limit")
        log.info(
            "still working: %d chunk(s) in flight, none finished for %.0f s",
            in_flight,
            time.monotonic() - waited_since,
        )


def map_chunks(
    work: Callable[[list[Item]], list[Result]],
    chunks: list[list[Item]],
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple,
    crashed: Callable[[Item], Result],
    timed_out: Callable[[Item], Result] | None = None,
    limits: Limits = Limits(),
) -> Iterator[Result]:
    """`work(chunk)` of every chunk, flattened in input order, from `workers` processes with at
    most two chunks each queued. `work` and `initializer` are module-level functions (the
    spawned processes import them)."""
    timed_out = timed_out or crashed
    executor = _pool(workers, initializer, initargs)
    in_flight: collections.deque[tuple[list[Item], concurrent.futures.Future]] = collections.deque()
    submitted = 0
    finished = False
    head_since = time.monotonic()  # when the chunk at the head of the queue could start at the latest
    fresh = True  # the workers have not finished a chunk yet: their start-up counts too
    try:
        while in_flight or submitted < len(chunks):
            try:
                while submitted < len(chunks) and len(in_flight) < 2 * workers:
                    try:
                        future = executor.submit(_run, work, chunks[submitted])
                    except concurrent.futures.process.BrokenProcessPool:
                        raise _Lost("a worker process died") from None
                    in_flight.append((chunks[submitted], future))
                    submitted += 1
                chunk, future = in_flight[0]
                deadline = limits.deadline(head_since, len(chunk), fresh)
                results = _result(future, deadline, limits, len(in_flight))
            except _Lost as lost:
                _kill(executor)
                items = [item for lost_chunk, _ in in_flight for item in lost_chunk]
                in_flight.clear()
                log.warning("%s; redoing its %d items one at a time to find which", lost, len(items))
                yield from _one_item_per_task(work, items, initializer, initargs, crashed, timed_out, limits)
                executor = _pool(workers, initializer, initargs)
                head_since, fresh = time.monotonic(), True
                continue
            except WorkerStartError:
                _kill(executor)
                raise
            in_flight.popleft()
            head_since, fresh = time.monotonic(), False
            yield from results
        finished = True
    finally:
        if finished:
            # Done: the workers exit (TF's teardown, ~1 s) while the caller goes on.
            executor.shutdown(wait=False, cancel_futures=True)
        else:
            _kill(executor)


def _one_item_per_task(
    work: Callable[[list[Item]], list[Result]],
    items: list[Item],
    initializer: Callable[..., None],
    initargs: tuple,
    crashed: Callable[[Item], Result],
    timed_out: Callable[[Item], Result],
    limits: Limits,
) -> Iterator[Result]:
    executor = _pool(1, initializer, initargs)
    fresh = True
    try:
        for item in items:
            deadline = limits.deadline(time.monotonic(), 1, fresh)
            future = executor.submit(_run, work, [item])
            try:
                yield from _result(future, deadline, limits, 1)
                fresh = False
                continue
            except _Lost:
                broken = future.done()  # done: the process died; not done: out of time
            _kill(executor)
            yield crashed(item) if broken else timed_out(item)
            executor = _pool(1, initializer, initargs)
            fresh = True
    finally:
        _kill(executor)


CGROUP = "/sys/fs/cgroup"


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return ""


def cpu_budget(cgroup: str = CGROUP) -> float:
    """CPUs this process may use: the affinity mask, capped by the cgroup's CPU quota (a pod's
    CPU limit), which the affinity mask does not show: on a large node every core is in the
    mask while the pod may use 4."""
    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    quota, _, period = _read(f"{cgroup}/cpu.max").partition(" ")  # cgroup v2: "400000 100000" or "max 100000"
    if not (quota and quota != "max" and period):
        quota, period = (
            _read(f"{cgroup}/cpu/cpu.cfs_quota_us"),
            _read(f"{cgroup}/cpu/cpu.cfs_period_us"),
        )  # v1
    try:
        if int(quota) > 0 and int(period) > 0:
            cpus = min(cpus, int(quota) / int(period))
    except ValueError:
        pass
    return cpus


def memory_budget(cgroup: str = CGROUP) -> int | None:
    """Bytes the cgroup (a pod's memory limit) allows, or None when unlimited."""
    for path in (f"{cgroup}/memory.max", f"{cgroup}/memory/memory.limit_in_bytes"):
        value = _read(path)
        # cgroup v1 writes "no limit" as a huge number near 2**63.
        if value.isdigit() and int(value) < 2**60:
            return int(value)
    return None
