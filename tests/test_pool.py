"""The crash-surviving process pool (components.pool), on plain numbers: the pool alone, apart
from the images it was made for (test_preprocess.py runs it with the step's own worker)."""

from __future__ import annotations

import os

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
