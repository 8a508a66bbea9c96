"""Driving a provider batch to its end in tests: the fake upstream moves a batch one step per
status read, so polling needs no clock. For any :class:`skinflint.interfaces.BatchAPI`."""

from __future__ import annotations

from collections.abc import Sequence

from skinflint.interfaces import BatchAPI
from skinflint.models import BatchLine, BatchOutcome, BatchStatus

__all__ = ["finish", "run_batch"]


async def finish(api: BatchAPI, batch_id: str, *, limit: int = 10,
                 timeout: float = 5) -> list[BatchStatus]:
    """Every status read until the batch leaves ``running`` (at most ``limit`` reads)."""
    seen = [await api.batch_status(batch_id, timeout)]
    while seen[-1].state == "running" and len(seen) < limit:
        seen.append(await api.batch_status(batch_id, timeout))
    return seen


async def run_batch(api: BatchAPI, lines: Sequence[BatchLine], *,
                    timeout: float = 5) -> dict[str, BatchOutcome]:
    """Submit ``lines``, poll the batch to its end and return each line's outcome by id;
    asserts the batch ended."""
    batch_id = await api.submit_batch(lines, timeout)
    last = (await finish(api, batch_id, timeout=timeout))[-1]
    assert last.state == "ended", f"batch {batch_id} did not end: {last}"
    return {o.custom_id: o for o in await api.batch_results(batch_id, timeout)}
