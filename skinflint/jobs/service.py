"""The batch service: the background task that sends queued jobs to provider batch APIs, polls
them and records their results (see :mod:`skinflint.jobs.settle`).

Every gateway process runs it, but only the one holding the job store's lease acts (``serve
--workers N`` processes share the SQLite file, replicas the PostgreSQL database). The holder
renews it every round and, during a long round, every third of :data:`LEASE_SECONDS`; the
others take over within that time when it stops (at once when it closes gracefully, as it
gives the lease back, or when it was killed and a process restarts on the same machine).
Each round (every ``tick`` seconds, or at once when woken), the holder:

1. on its first round, resumes: provider batches recorded but not known to be sent (the
   process stopped between writing its intent and the provider's answer) are sent again, with
   a warning: if the provider had received the first copy, its lines run twice upstream (each
   job's first result is the only one recorded and ledgered): the window between the
   provider's answer to the create call and the local write of its id;
2. sends each group of queued jobs (provider, model, and passed-through batch) that is due
   (``window_seconds`` after its oldest deferred request, at once for a passed-through batch)
   or holds ``max_lines`` jobs: the batch is written with its jobs first (the intent), then
   sent, then marked sent with the provider's id;
3. polls every sent batch whose turn has come (``poll_seconds`` apart) and, once it has
   ended, records its results;
4. counts the jobs waiting (the ``skinflint_jobs_waiting`` gauge) and, every
   :data:`PURGE_SECONDS`, starts deleting in the background what ended more than
   ``keep_days`` ago (:meth:`BatchService.purge`): finished jobs, and the uploaded files and
   passed-through batches no job waits on, :data:`PURGE_ROWS` of each per transaction.

A batch the provider refuses outright (a 4xx) fails its jobs as a failed line would; one it
could not be reached for is given back to the queue and tried in a later round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from skinflint.config import BatchingConfig
from skinflint.errors import UpstreamError, UpstreamStatusError
from skinflint.interfaces import BatchAPI, Job, JobStore, Provider, ProviderBatch, Purged
from skinflint.jobs.settle import Settler, line_body
from skinflint.metrics import Metrics
from skinflint.models import BatchLine, BatchOutcome

__all__ = ["LEASE_SECONDS", "PURGE_ROWS", "PURGE_SECONDS", "BatchService"]

log = logging.getLogger("skinflint.batches")

#: How long the lease lasts unless renewed; a process that died is replaced after this.
LEASE_SECONDS = 30.0
#: The longest pause between two rounds.
MAX_TICK = 5.0
#: The pause between two rounds when no provider has a batch API: nothing new can be deferred
#: or batched, and the rounds only settle what an earlier configuration left and purge.
IDLE_TICK = 60.0
#: How long closing waits for webhooks in flight.
CLOSE_GRACE = 5.0
#: How often the lease holder deletes what ended more than ``keep_days`` ago.
PURGE_SECONDS = 300.0
#: Rows of each kind deleted per transaction (a large purge never holds a lock for long).
PURGE_ROWS = 1000
_DAY = 86_400.0
_WAITING = ("queued", "submitted")


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


def dead_here(owner: str) -> bool:
    """Whether ``owner`` (see :func:`_owner`) was a process of this machine that is gone (it
    was killed, and restarted here): its lease need not be waited for."""
    host, pid, _ = [*owner.rsplit(":", 2), "", ""][:3]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _report_purge_failure(done: asyncio.Future[Purged]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("batches: deleting old jobs failed (tried again later): %s", done.exception())


class BatchService:
    """See the module docstring. :meth:`round` runs one round (tests call it); :meth:`start`
    runs rounds in the background until :meth:`close`."""

    def __init__(
        self, store: JobStore, providers: Mapping[str, Provider], config: BatchingConfig,
        settler: Settler, *, timeouts: Mapping[str, float],
        clock: Callable[[], float] = time.time, metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.config = config
        self.settler = settler
        self.owner = _owner()
        self._apis = {n: p for n, p in providers.items() if isinstance(p, BatchAPI)}
        self._timeouts = timeouts
        self._clock = clock
        self.tick = max(0.02, min(config.window_seconds or MAX_TICK, config.poll_seconds,
                                  MAX_TICK)) if self._apis else IDLE_TICK
        self._next_poll: dict[str, float] = {}
        self._resumed = False
        self._checked = False  # whether a dead holder of the lease was looked for
        self.leading = False
        self._woken = asyncio.Event()
        self._stopping = False
        self._loop: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._purging: asyncio.Task[Purged] | None = None
        self._next_purge = 0.0

    def batch_api(self, provider: str) -> BatchAPI | None:
        return self._apis.get(provider)

    def start(self) -> None:
        """Run rounds in the background. Without a provider that has a batch API they are
        :data:`IDLE_TICK` apart: jobs an earlier configuration left are settled (failed, or
        asked in real time, as ``on_failure`` says) and what ended is purged, uploads too."""
        self._loop = asyncio.ensure_future(self._run())
        self._keeper = asyncio.ensure_future(self._keep_lease())

    def wake(self) -> None:
        """Run a round now (a passed-through batch is due at once)."""
        self._woken.set()

    async def close(self) -> None:
        """Let the round under way finish (up to :data:`CLOSE_GRACE` seconds: a batch being
        sent is then marked sent, not sent again after the restart), then stop."""
        self._stopping = True
        self._woken.set()
        if self._loop is not None:
            await asyncio.wait([self._loop], timeout=CLOSE_GRACE)
        for task in (self._loop, self._keeper, self._purging):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.leading:
            try:
                await self.store.release(self.owner)
            except Exception:  # closing must go on: the lease then expires by itself
                log.exception("batches: could not give the lease back")
        await self.settler.close(CLOSE_GRACE)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.round()
            except Exception:  # a failed round (database or provider down) must not end them
                log.exception("batches: a round failed")
            self._woken.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self.tick)

    async def _keep_lease(self) -> None:
        """Renew the lease while a long round runs (sending 50,000 lines may take longer than
        the lease lasts): a process alive keeps it."""
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            if self.leading:
                try:
                    self.leading = await self.store.lease(self.owner, LEASE_SECONDS,
                                                          self._clock())
                except Exception:  # the next round tries again
                    log.exception("batches: could not renew the lease")

    async def round(self) -> None:
        now = self._clock()
        self.leading = await self.store.lease(self.owner, LEASE_SECONDS, now)
        if not self.leading and not self._checked:
            self._checked = True  # once: a holder alive now renews, or expires by itself
            holder = await self.store.lease_holder()
            if holder is not None and dead_here(holder):
                log.warning("batches: the process that sent batches (%s) is gone; taking over",
                            holder)
                await self.store.release(holder)
                self.leading = await self.store.lease(self.owner, LEASE_SECONDS, now)
        if not self.leading:
            self._resumed = False  # whoever leads next resumes
            if self.metrics is not None:
                self.metrics.jobs_waiting.clear()  # the holder shows it
            return
        if not self._resumed:
            await self._resume()
            self._resumed = True
        await self._send_due(now)
        await self._poll(now)
        await self._count_waiting()
        if now >= self._next_purge and (self._purging is None or self._purging.done()):
            self._next_purge = now + PURGE_SECONDS
            self._purging = asyncio.ensure_future(self.purge())
            self._purging.add_done_callback(_report_purge_failure)

    async def _count_waiting(self) -> None:
        if self.metrics is None:
            return
        waiting = await self.store.waiting()
        for state in _WAITING:
            self.metrics.jobs_waiting.labels(state).set(waiting.get(state, 0))

    async def purge(self) -> Purged:
        """Delete what ended more than ``keep_days`` ago (see :meth:`JobStore.purge`),
        :data:`PURGE_ROWS` of each kind per transaction, while this process holds the lease;
        then give the space back where the store does that. What was deleted."""
        before = self._clock() - self.config.keep_days * _DAY
        total = Purged()
        while self.leading and not self._stopping:
            started = time.monotonic()
            done = await self.store.purge(before, PURGE_ROWS)
            total = Purged(*(a + b for a, b in zip(total, done, strict=True)))
            self._count_purged(done)
            if max(done) < PURGE_ROWS:
                break
            # as long again before the next step: a purge takes at most half the store's time
            await asyncio.sleep(min(time.monotonic() - started, 1.0))
        if total.total:
            await self.store.reclaim()
            log.info("batches: deleted %d jobs, %d files, %d batches and %d provider batches"
                     " that ended more than %g days ago", total.jobs, total.files,
                     total.batches, total.provider_batches, self.config.keep_days)
        return total

    def _count_purged(self, done: Purged) -> None:
        if self.metrics is None:
            return
        for kind, n in (("job", done.jobs), ("file", done.files), ("batch", done.batches),
                        ("provider_batch", done.provider_batches)):
            if n:
                self.metrics.child(self.metrics.jobs_purged, kind).inc(n)

    async def _resume(self) -> None:
        for batch in await self.store.unfinished():
            if not batch.provider_id:
                n = await self.store.requeue(batch.id)
                log.warning("batches: batch %s of %d lines for %s was being sent when the "
                            "gateway stopped; it is sent again (if %s had received it, its "
                            "lines run twice there; each is recorded once)", batch.id, n,
                            batch.model, batch.provider)

    async def _send_due(self, now: float) -> None:
        for group in await self.store.queued():
            if group.due > now and group.jobs < self.config.max_lines:
                continue
            while True:
                batch = ProviderBatch(f"pb_{os.urandom(10).hex()}", group.provider,
                                      group.model, group.group, now)
                jobs = await self.store.claim(batch, self.config.max_lines)
                if not jobs:
                    break
                await self._send(batch, jobs)
                if len(jobs) < self.config.max_lines:
                    break

    async def _send(self, batch: ProviderBatch, jobs: list[Job]) -> None:
        api = self._apis.get(batch.provider)
        if api is None:  # its provider lost its batch API (configuration changed)
            await self._without_api(batch, jobs)
            return
        lines = [BatchLine(j.id, line_body(j)) for j in jobs]
        try:
            provider_id = await api.submit_batch(lines, self._timeouts.get(batch.provider, 600))
        except UpstreamStatusError as exc:
            if exc.status >= 500 or exc.status == 429:
                await self._give_back(batch, exc)
                return
            log.warning("batches: %s refused batch %s: %s", batch.provider, batch.id, exc)
            await self.settler.settle(jobs, [BatchOutcome(j.id, error="failed",
                                                          message=exc.message) for j in jobs])
            return
        except UpstreamError as exc:
            await self._give_back(batch, exc)
            return
        await self.store.submitted(batch.id, provider_id)
        self._next_poll[batch.id] = self._clock() + self.config.poll_seconds
        log.info("batches: sent %d lines for %s as %s batch %s", len(jobs), batch.model,
                 batch.provider, provider_id)

    async def _give_back(self, batch: ProviderBatch, exc: UpstreamError) -> None:
        n = await self.store.requeue(batch.id)
        log.warning("batches: could not send %d lines to %s (%s); tried again later", n,
                    batch.provider, exc)

    async def _poll(self, now: float) -> None:
        for batch in await self.store.unfinished():
            if not batch.provider_id or self._next_poll.get(batch.id, 0.0) > now:
                continue
            self._next_poll[batch.id] = now + self.config.poll_seconds
            try:
                await self._check(batch)
            except UpstreamError as exc:
                log.warning("batches: could not poll %s batch %s: %s", batch.provider,
                            batch.provider_id, exc)

    async def _check(self, batch: ProviderBatch) -> None:
        api = self._apis.get(batch.provider)
        if api is None:  # sent before its provider lost its batch API: its results are lost
            await self._without_api(batch, await self.store.batch_jobs(batch.id))
            self._next_poll.pop(batch.id, None)
            return
        timeout = self._timeouts.get(batch.provider, 600)
        status = await api.batch_status(batch.provider_id, timeout)
        if status.state == "running":
            return
        jobs = await self.store.batch_jobs(batch.id)
        cancelled = await self._cancelled(batch)
        if status.state == "failed":
            outcomes = [BatchOutcome(j.id, error="failed",
                                     message=f"the batch failed: {status.detail}")
                        for j in jobs]
        else:
            outcomes = await api.batch_results(batch.provider_id, timeout)
        done = await self.settler.settle(jobs, outcomes, cancelled=cancelled)
        self._next_poll.pop(batch.id, None)
        log.info("batches: %s batch %s %s; %d lines recorded", batch.provider,
                 batch.provider_id, status.detail, len(done))

    async def _without_api(self, batch: ProviderBatch, jobs: list[Job]) -> None:
        """Settle ``jobs`` of a provider that has no batch API any more (failed, or asked in
        real time, as ``on_failure`` says)."""
        await self.settler.settle(jobs, [BatchOutcome(
            j.id, error="failed", message=f"{batch.provider} has no batch API") for j in jobs],
            cancelled=await self._cancelled(batch))

    async def _cancelled(self, batch: ProviderBatch) -> bool:
        if not batch.group:
            return False
        found = await self.store.get_batch(batch.group)
        return found is not None and bool(found.cancelled)

    async def cancel(self, group: str) -> None:
        """Cancel a passed-through batch: its queued jobs now, its sent provider batches
        through their providers (their lines come back cancelled)."""
        now = self._clock()
        cancelled = await self.store.cancel_batch(group, now)
        for job in cancelled:
            self.settler.account_cancelled(job)
        for batch in await self.store.unfinished():
            api = self._apis.get(batch.provider)
            if batch.group != group or not batch.provider_id or api is None:
                continue
            try:
                await api.cancel_batch(batch.provider_id, self._timeouts.get(batch.provider, 600))
            except UpstreamError as exc:
                log.warning("batches: could not cancel %s batch %s: %s", batch.provider,
                            batch.provider_id, exc)
            self._next_poll[batch.id] = now  # poll it at the next round
        self.wake()
