"""Batches built ahead on a thread: the host packs and transfers while the device steps.

`Prefetcher` runs an iterator on a background thread into a bounded queue, so at most `depth`
items are ahead of the consumer; an exception in the iterator is raised by the `next` call that
would have returned its item. The trainer's items carry the data position after each batch, so a
checkpoint records the position of the step it saves, not of the batches read ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

_DONE = object()


class Prefetcher:
    """Iterates `items` on a daemon thread, at most `depth` items ahead. Close it when done."""

    def __init__(self, items: Iterator[Any], depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1; got {depth}.")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(items,), daemon=True,
                                        name="prefetch")
        self._thread.start()

    def _fill(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except Exception as e:  # pylint: disable=broad-except  # re-raised by __next__
            self._put(e)
            return
        self._put(_DONE)

    def _put(self, item: Any) -> bool:
        """Blocks until there is room, or until closed (then returns False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)
            raise StopIteration
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        """Stops the thread (it finishes the item it is building) and drops what is queued."""
        self._stop.set()
        self._thread.join()
