"""Group commit: calls that arrive while a batch is being written go together into the next one,
so one slow step (an fsync, a Ray call) serves many callers, each answered with its own results
once its batch is done. Used by the audit logger (one fsync per batch) and by the replicas'
calls to the audit logger and the quota authority (one Ray call per batch)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


def unwrap(result):
    """One item's answer from a batch whose failed items hold their exception in their place:
    its result, or the failure of that item alone raised."""
    if isinstance(result, BaseException):
        raise result
    return result


class GroupCommit:
    def __init__(self, flush: Callable[[list], Awaitable[list]]):
        """`flush(items)` handles a batch and returns one result per item, in order."""
        self.flush = flush
        self.waiting: list[tuple[list, asyncio.Future]] = []
        self.writer: asyncio.Task | None = None

    async def submit(self, items: list) -> list:
        """The results of `items`, once the batch they went into is flushed."""
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((items, future))
        if self.writer is None or self.writer.done():
            self.writer = asyncio.get_running_loop().create_task(self._write())
        return await future

    async def _write(self) -> None:
        while self.waiting:
            batch, self.waiting = self.waiting, []
            try:
                results = await self.flush([item for items, _ in batch for item in items])
            except Exception as exc:  # each caller of the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for items, future in batch:
                if not future.done():
                    future.set_result(list(results[start:start + len(items)]))
                start += len(items)
