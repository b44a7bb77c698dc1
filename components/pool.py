"""A process pool that survives a task killing its process.

Native decoders have bugs that abort the process (TF 2.21 does on some inputs). With
multiprocessing.Pool a lost task is waited for forever; concurrent.futures reports the broken
pool instead, and `map_chunks` then redoes the chunks that were in flight one item per task
in a fresh process, so that only the item that kills its process is lost (`crashed` says what
to yield for it) and every other item's result comes back, in input order.

Processes are spawned, not forked: a fork would copy TensorFlow's threads and locks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import multiprocessing
from collections.abc import Callable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


def _pool(
    workers: int, initializer: Callable[..., None], initargs: tuple
) -> concurrent.futures.ProcessPoolExecutor:
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer, initargs=initargs
    )


def map_chunks(
    work: Callable[[list[Item]], list[Result]],
    chunks: list[list[Item]],
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple,
    crashed: Callable[[Item], Result],
) -> Iterator[Result]:
    """`work(chunk)` of every chunk, flattened in input order, from `workers` processes with at
    most two chunks each queued. `work` and `initializer` are module-level functions (the
    spawned processes import them)."""
    executor = _pool(workers, initializer, initargs)
    in_flight: collections.deque[tuple[list[Item], concurrent.futures.Future]] = collections.deque()
    submitted = 0
    finished = False
    try:
        while in_flight or submitted < len(chunks):
            while submitted < len(chunks) and len(in_flight) < 2 * workers:
                in_flight.append((chunks[submitted], executor.submit(work, chunks[submitted])))
                submitted += 1
            chunk, future = in_flight.popleft()
            try:
                results = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                executor.shutdown(wait=True, cancel_futures=True)
                lost = [item for lost_chunk in [chunk, *(c for c, _ in in_flight)] for item in lost_chunk]
                in_flight.clear()
                log.warning(
                    "a worker process died; redoing its %d items one at a time to find which", len(lost)
                )
                yield from _one_item_per_task(work, lost, initializer, initargs, crashed)
                executor = _pool(workers, initializer, initargs)
                continue
            yield from results
        finished = True
    finally:
        # Done: the workers exit (TF's teardown, ~1 s) while the caller goes on with the results.
        executor.shutdown(wait=not finished, cancel_futures=True)


def _one_item_per_task(
    work: Callable[[list[Item]], list[Result]],
    items: list[Item],
    initializer: Callable[..., None],
    initargs: tuple,
    crashed: Callable[[Item], Result],
) -> Iterator[Result]:
    executor = _pool(1, initializer, initargs)
    try:
        for item in items:
            try:
                yield from executor.submit(work, [item]).result()
            except concurrent.futures.process.BrokenProcessPool:
                yield crashed(item)
                executor.shutdown(wait=True)
                executor = _pool(1, initializer, initargs)
    finally:
        executor.shutdown(wait=True)
