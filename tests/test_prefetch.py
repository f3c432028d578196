"""The prefetch thread: items in order, never more than `depth` ahead, errors re-raised."""

import threading

import pytest

from bloom_jax import prefetch


def test_items_come_in_order_and_at_most_depth_ahead():
    produced = []
    consumed = threading.Event()

    def items():
        for i in range(6):
            produced.append(i)
            yield i

    batches = prefetch.Prefetcher(items(), depth=2)
    try:
        consumed.wait(0.3)  # let the thread fill the queue
        # Two queued, and the third built and waiting for room.
        assert len(produced) <= 3
        assert list(batches) == list(range(6))
    finally:
        batches.close()


def test_an_error_in_the_iterator_is_raised_where_its_item_was_due():
    def items():
        yield 1
        raise OSError("disk gone")

    batches = prefetch.Prefetcher(items())
    try:
        assert next(batches) == 1
        with pytest.raises(OSError, match="disk gone"):
            next(batches)
    finally:
        batches.close()


def test_close_stops_a_thread_waiting_for_room():
    batches = prefetch.Prefetcher(iter(range(100)), depth=1)
    batches.close()
    assert not batches._thread.is_alive()  # pylint: disable=protected-access
