"""Overlap across cases: load case n+1 and write case n-1 while case n is explained.

A folder or a cohort of CTs spends most of its time reading DICOM and writing outputs, little
in the model. :func:`overlapped` runs the three steps of consecutive cases at the same time, on
threads (reading and writing mostly wait on disks, zlib, NumPy and highdicom; the model keeps
the calling thread, so a GPU stays in one thread):

- a loader thread reads up to ``depth`` cases ahead (a bounded queue: at most ``depth`` loaded
  cases wait);
- the calling thread explains one case at a time, in order;
- a writer thread writes one case at a time, in order; case n's outputs are committed before
  case n+1's start.

So at most ``depth + 2`` cases are in memory: the one written, the one explained, and those
loaded ahead. Every case gets the same calls as in a serial loop (same outputs), results come
back in input order, and an error stays with its case: it is delivered after the cases before
it have been written, and the caller decides whether to go on (a cohort records it and
continues) or stop (``medcam explain``: cases already written stay written, nothing after the
failed case is written). ``depth=0`` runs everything serially in the calling thread.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from medcam.progress import case as progress_case

__all__ = ["Outcome", "overlapped"]

T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    """What became of one item: the value ``write`` returned, or the error of its first step
    that failed (``stage`` says which: ``"load"``, ``"explain"`` or ``"write"``)."""

    item: T
    value: Any = None
    error: BaseException | None = None
    stage: str = ""


def _in_case(label: str, fn: Callable, *args: Any) -> Any:
    with progress_case(label):
        return fn(*args)


def overlapped(
    items: Sequence[T] | Iterable[T],
    load: Callable[[T], Any],
    explain: Callable[[T, Any], Any],
    write: Callable[[T, Any], Any],
    *,
    depth: int = 1,
    label: Callable[[T], str] = str,
) -> Iterator[Outcome[T]]:
    """``write(item, explain(item, load(item)))`` for every item, steps of consecutive items
    overlapped; yields one :class:`Outcome` per item, in order, as soon as it is written.

    ``label(item)`` names the item for progress reports (:mod:`medcam.progress`); the steps
    run in a copy of the caller's context, so a reporter installed by the caller hears all of
    them. Closing the iterator early waits for the write in flight (never left half done) and
    cancels loads not yet started.
    """
    items = list(items)
    if depth <= 0:
        for item in items:
            yield _serial(item, load, explain, write, label(item))
        return
    loader = ThreadPoolExecutor(1, thread_name_prefix="medcam-load")
    writer = ThreadPoolExecutor(1, thread_name_prefix="medcam-write")
    loads: deque[Future] = deque()
    pending: tuple[T, Future] | None = None
    submitted = 0

    def top_up(ahead: int) -> None:
        nonlocal submitted
        while submitted < len(items) and len(loads) < ahead:
            item = items[submitted]
            ctx = contextvars.copy_context()
            loads.append(loader.submit(ctx.run, _in_case, label(item), load, item))
            submitted += 1

    def finish(entry: tuple[T, Future]) -> Outcome[T]:
        item, future = entry
        try:
            return Outcome(item, future.result())
        except Exception as err:
            return Outcome(item, error=err, stage="write")

    try:
        top_up(1)  # the first case
        for item in items:
            future = loads.popleft()
            top_up(depth)  # the next ones load while this one is explained
            name = label(item)
            try:
                loaded = future.result()
            except Exception as err:
                if pending is not None:
                    yield finish(pending)
                    pending = None
                yield Outcome(item, error=err, stage="load")
                continue
            try:
                explained = _in_case(name, explain, item, loaded)
            except Exception as err:
                if pending is not None:
                    yield finish(pending)
                    pending = None
                yield Outcome(item, error=err, stage="explain")
                continue
            finally:
                del loaded
            if pending is not None:  # case n-1 is written before case n starts writing
                yield finish(pending)
            ctx = contextvars.copy_context()
            pending = (item, writer.submit(ctx.run, _in_case, name, write, item, explained))
            del explained
        if pending is not None:
            yield finish(pending)
            pending = None
    finally:
        for future in loads:
            future.cancel()
        loader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)  # a write in flight completes: its case is whole


def _serial(item, load, explain, write, name: str) -> Outcome:
    stage = "load"
    try:
        with progress_case(name):
            loaded = load(item)
            stage = "explain"
            explained = explain(item, loaded)
            del loaded
            stage = "write"
            return Outcome(item, write(item, explained))
    except Exception as err:
        return Outcome(item, error=err, stage=stage)
