"""Blocking iteration over an async iterator running on another thread's event loop (the blocking clients)."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator

_END = object()


def iterate_on_loop(make: Callable[[], AsyncIterator], loop: asyncio.AbstractEventLoop, timeout_s: float,
                    on_timeout: Callable[[], Exception]) -> Iterator:
    """Yields the items of make() (called on `loop`) as they arrive; re-raises its exception; raises
    on_timeout() after timeout_s without an item. Leaving early cancels the iteration on its loop, so the
    async side's cleanup (abort, CANCEL) runs now."""
    items: queue.Queue = queue.Queue()

    async def pump():
        try:
            async for item in make():
                items.put(item)
        except BaseException as e:
            items.put(e)
        finally:
            items.put(_END)

    future = asyncio.run_coroutine_threadsafe(pump(), loop)
    finished = False
    try:
        while True:
            try:
                item = items.get(timeout=timeout_s)
            except queue.Empty:
                raise on_timeout() from None
            if item is _END:
                finished = True
                return
            if isinstance(item, BaseException):
                finished = True
                raise item
            yield item
    finally:
        if not finished:
            future.cancel()
