"""One task a process: the pool that ingest and validation fan their work out to."""

from __future__ import annotations

import multiprocessing
from typing import Callable, Iterable, Iterator, TypeVar

Task = TypeVar("Task")
Result = TypeVar("Result")


def map_in_order(function: Callable[[Task], Result], tasks: Iterable[Task], workers: int) -> Iterator[Result]:
    """``function(task)`` for every task, in input order (so what is written from the results is
    deterministic). In this process when ``workers <= 1`` or there is one task, else in
    ``min(workers, len(tasks))`` spawned processes, one task at a time each (``function`` must be
    a module-level function, picklable by name)."""
    tasks = list(tasks)
    if workers <= 1 or len(tasks) <= 1:
        yield from map(function, tasks)
        return
    # spawn, not fork: the parent may already hold threads (s3fs's event loop, a writer's
    # filesystem) whose locks a forked child would inherit in an undefined state.
    with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        # imap (not imap_unordered): results arrive in input order; chunksize 1 keeps every worker busy.
        yield from pool.imap(function, tasks, chunksize=1)


__all__ = ["map_in_order"]
