"""The shadow-evaluation guard: a shared service that watches a cost-saving strategy's quality
by sampling the requests it changed, sending the client's unchanged request upstream after the
client has its answer, and scoring the two answers.

For a ``shadow.sample`` fraction of a feature's compressed requests (``compression.<scope>.
shadow``), :meth:`ShadowGuard.observe` starts a background call, never on the request's path:
at most ``max_in_flight`` run at once, and a request sampled while they all run is dropped and
counted. Each call is tried once, with its provider's timeout: a failure loses the sample,
logged and counted, never retried. Each call (and a judge model's, when one scores) is a
ledger row of strategy
``shadow``: its cost counts, it is not a client request; the uncompressed call's row holds the
pair's score in its ``similarity`` column. The score goes to a window per (feature, strategy)
(:mod:`skinflint.pipeline.shadow_score`), which tests whether the strategy's mean score is
below ``floor``: once at ``min_samples`` samples (the earliest the guard decides), then at every
sample by betting against the floor. When the test says it is below, the strategy is switched
off for the feature: :meth:`enabled` says False, the log says why, and an alert of rule
``shadow-guard`` (name ``<feature>/<strategy>``) is recorded for ``GET /api/alerts``. Only an
operator switches it back on (:meth:`enable`), which closes the alert and starts a fresh
window and test. :meth:`rows` shows, per (feature, strategy), the samples in the window, their
mean, as ``bound`` the test's evidence against the floor (the betting wealth: 1 at the start,
grown by scores below the floor, switched off at ``1 / DELTA``, 100), the floor and the state.

Every process shares one test per (feature, strategy) when the ledger is shared (a SQLite
file, PostgreSQL): each sample is logged in the alert store (:meth:`AlertStore.add_score
<skinflint.storage.alert_store.AlertStore.add_score>`), and every process applies the logged
samples in the order they were logged, so ``serve --workers N`` and replicas decide on all
their samples together, the same way, and the evidence survives a restart (a strategy's
samples since its last re-enable are kept, at most
:data:`~skinflint.storage.alert_store.SCORES_KEPT`, and replayed at start). The switch itself
is the open ``shadow-guard`` alert: a process learns within :data:`SYNC_SECONDS` that another
switched a strategy off, or that an operator switched it back on (a re-enable is logged as a
mark where the test starts afresh, and the samples before it are deleted). With a ledger in
memory, the test and the switch are the process's own and last until it stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from skinflint.alerts import AlertEvent
from skinflint.config import ShadowPolicy
from skinflint.errors import SkinflintError
from skinflint.interfaces import Ledger, Vector
from skinflint.metrics import Metrics
from skinflint.models import SHADOW_CALL, Completion, LedgerRecord, Usage
from skinflint.pipeline.context import RequestContext, Target
from skinflint.pipeline.shadow_score import (
    Window,
    answer_text,
    cosine,
    exact_score,
    is_structured,
    word_cosine,
)
from skinflint.pipeline.upstream import (
    ProviderUpstream,
    ServiceUpstream,
    record_side_call,
    side_call_row,
)
from skinflint.pricing import PriceCatalog
from skinflint.storage.alert_store import AlertStore

__all__ = ["ALERT_RULE", "SYNC_SECONDS", "ProviderUpstream", "ShadowGuard", "ShadowUpstream"]

log = logging.getLogger("skinflint.shadow")

JSON = dict[str, Any]
ALERT_RULE = "shadow-guard"
SYNC_SECONDS = 2.0  # how often a process reads the samples and switches others logged
_PAGE = 5000  # logged samples read at a time
_PER = "feature"
_JUDGE_PROMPT = (
    "Two answers to the same request follow. Reply YES if they agree in substance (the same "
    "facts, decisions and format), NO otherwise. Reply with one word."
)


#: Where shadow calls go (the name the guard has always used for it).
ShadowUpstream = ServiceUpstream


@dataclass(frozen=True, slots=True)
class _Job:
    """What a shadow call needs of the request it shadows."""

    ctx: RequestContext
    policy: ShadowPolicy
    target: Target
    strategies: tuple[str, ...]
    original: JSON
    answer: str


@dataclass(slots=True)
class _Watch:
    window: Window
    floor: float | None = None  # None: not scored since the process started
    min_samples: int = 0
    off_since: float | None = None


class ShadowGuard:
    """See the module docstring. ``policies(feature, route)`` gives a request's shadow policy
    (None: not shadowed); ``vector`` embeds a text for the ``similarity`` judge (None, or a
    None vector: word counts instead)."""

    def __init__(
        self,
        policies: Callable[[str, str], ShadowPolicy | None],
        upstream: ShadowUpstream,
        *,
        ledger: Ledger,
        catalog: PriceCatalog,
        metrics: Metrics,
        alerts: AlertStore | None = None,
        vector: Callable[[str], Awaitable[Vector | None]] | None = None,
        max_in_flight: int = 4,
        sampler: Callable[[], float] = random.random,
        sync_seconds: float = SYNC_SECONDS,
    ) -> None:
        self._policies = policies
        self._upstream = upstream
        self._ledger = ledger
        self._catalog = catalog
        self._metrics = metrics
        self._alerts = alerts
        self._vector = vector
        self._max_in_flight = max_in_flight
        self._sample = sampler
        self._watches: dict[tuple[str, str], _Watch] = {}
        self._off: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0
        self._sync_seconds = sync_seconds
        self._syncing = asyncio.Lock()  # one sync (or re-enable) at a time
        self._applied: int | None = None  # the newest logged sample applied (None: none read)
        self._stored_off: set[tuple[str, str]] = set()  # open alerts at the last sync
        self._following: asyncio.Task[None] | None = None

    @property
    def alert_store(self) -> AlertStore | None:
        return self._alerts

    def enabled(self, feature: str, strategy: str) -> bool:
        """False once the guard switched ``strategy`` off for ``feature``."""
        return (feature, strategy) not in self._off

    def observe(self, ctx: RequestContext, answer_body: JSON) -> None:
        """Maybe shadow a request that was answered: cheap, never waits."""
        compression = ctx.compression
        if compression is None or ctx.answered is None or ctx.status != 200:
            return
        policy = self._policies(ctx.feature, ctx.requested_model)
        if policy is None or self._sample() >= policy.sample:
            return
        if len(self._tasks) >= self._max_in_flight:
            self.dropped += 1
            self._count("dropped")
            return
        job = _Job(ctx, policy, ctx.answered, compression.strategies,
                   compression.original_body, answer_text(answer_body))
        task = asyncio.ensure_future(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the shadow calls under way."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def start(self) -> None:
        """Follow the samples and switches other processes log (with a shared store)."""
        if self._alerts is not None and self._following is None:
            self._following = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._sync_seconds)
            try:
                await self.sync()
            except Exception:  # the store is away: the next round tries again
                log.exception("shadow guard: reading the shared samples and switches failed")

    async def close(self) -> None:
        """Abandon the shadow calls under way: they are samples, not requests."""
        if self._following is not None:
            self._following.cancel()
            await asyncio.gather(self._following, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def restore(self) -> None:
        """Replay the logged samples and switch off what the open ``shadow-guard`` alerts
        say is off: the test and the switches as they were before a restart."""
        await self.sync()

    async def sync(self) -> None:
        """Apply the samples logged since the last sync (every process's, in the order they
        were logged), then take the switches as the store has them."""
        if self._alerts is None:
            return
        async with self._syncing:
            await self._read_switches(self._alerts)
            await self._read_samples(self._alerts)

    async def _read_samples(self, store: AlertStore) -> None:
        replay = self._applied is None  # the first read: what was logged before this start
        while True:
            rows = await store.scores_after(self._applied or 0, _PAGE)
            # a strategy's samples logged before an operator's re-enable later in these rows
            # decide nothing: the mark starts its test afresh
            marks = Counter(name for _, name, score, _, _ in rows if score is None)
            for id_, name, score, floor, min_samples in rows:
                feature, _, strategy = name.rpartition("/")
                if score is None:
                    marks[name] -= 1
                decide = not replay and not marks[name]
                await self._apply(feature, strategy, score, floor, min_samples, decide=decide)
                self._applied = id_
            if len(rows) < _PAGE:
                break
        if self._applied is None:
            self._applied = 0
        if replay:  # the processes that logged the samples decided on each: judged once here
            for (feature, strategy), watch in list(self._watches.items()):
                await self._decide(feature, strategy, watch)

    async def _read_switches(self, store: AlertStore) -> None:
        found = {(f, s) for f, _, s in (e.name.rpartition("/") for e in await self._open(store))}
        for key in sorted(found - self._off):  # switched off elsewhere, or before a restart
            self._off.add(key)
            self._watches.setdefault(key, _Watch(Window()))
            log.info("shadow guard: %s is off for feature %r until enabled", key[1], key[0])
        for key in sorted((self._stored_off - found) & self._off):  # an operator, elsewhere
            self._off.discard(key)
            self._restart(key)  # the evidence that switched it off is spent
            log.info("shadow guard: %s was switched back on for feature %r", key[1], key[0])
        self._stored_off = found
        self._metrics.shadow_off.set(len(self._off))

    @staticmethod
    async def _open(store: AlertStore) -> list[AlertEvent]:
        """The ``shadow-guard`` alerts still open, whatever the clocks of the processes that
        recorded them say."""
        return await store.open_at(ALERT_RULE, _PER, math.inf)

    async def enable(self, feature: str, strategy: str) -> bool:
        """Switch a strategy back on for a feature, with a fresh test; False if it was on."""
        key = (feature, strategy)
        async with self._syncing:
            if key not in self._off:
                return False
            if self._alerts is not None:  # the store first: a failure changes nothing here
                # the mark starts the test afresh in every process, this one included
                await self._alerts.add_score(f"{feature}/{strategy}", None, 0.0, 0)
                name = f"{feature}/{strategy}"
                started = max((e.start for e in await self._open(self._alerts)
                               if e.name == name), default=0.0)
                now = max(time.time(), math.nextafter(started, math.inf))
                await self._alerts.resolve(self._event(feature, strategy, now, now))
                self._stored_off.discard(key)
            self._off.discard(key)
            self._restart(key)
            self._metrics.shadow_off.set(len(self._off))
        log.warning("shadow guard: %s switched back on for feature %r by an operator",
                    strategy, feature)
        try:
            await self.sync()
        except Exception:  # switched on; the next round reads the rest
            log.exception("shadow guard: reading the shared samples after enabling failed")
        return True

    def _restart(self, key: tuple[str, str]) -> None:
        watch = self._watches.get(key)
        if watch is not None:
            watch.window.clear()
            watch.off_since = None

    def rows(self) -> list[JSON]:
        """Each watched (feature, strategy): its samples, mean score, evidence against the
        floor (``bound``), floor, state."""
        return [self._row(f, s, self._watches[f, s]) for f, s in sorted(self._watches)]

    def _row(self, feature: str, strategy: str, watch: _Watch) -> JSON:
        window = watch.window
        return {
            "feature": feature, "strategy": strategy, "samples": window.samples,
            "mean": round(window.mean, 4), "bound": float(f"{window.wealth:.4g}"),
            "floor": watch.floor, "state": "on" if self.enabled(feature, strategy) else "off",
        }

    async def _run(self, job: _Job) -> None:
        """A sample in the background, which must never fail unseen."""
        try:
            await self._shadow(job)
        except Exception:  # a bug or an answer of a shape nobody expected: logged, counted
            log.exception("shadow evaluation of %s failed", job.ctx.request_id)
            self._count("failed")

    async def _shadow(self, job: _Job) -> None:
        """The uncompressed call, its score, and its ledger row, which holds the score in its
        ``similarity`` column (None when the sample was lost)."""
        score = None
        try:
            reference, row = await self._call(job, job.target, job.original, ".shadow")
            try:
                score = await self._score(job, answer_text(reference.body), job.answer)
            finally:
                record_side_call(self._ledger, job.ctx,
                                 dataclasses.replace(row, similarity=score))
        except SkinflintError as exc:  # a sample lost, not a request: logged and counted
            log.info("shadow call for %s failed: %s", job.ctx.request_id, exc)
            self._count("failed")
            return
        self._count("scored")
        await self._add(job, score)

    async def _call(self, job: _Job, target: Target, body: JSON,
                    suffix: str) -> tuple[Completion, LedgerRecord]:
        """One call, and its ledger row (of strategy ``shadow``) to record; recorded here if
        the call fails."""
        started = time.perf_counter()
        try:
            completion = await self._upstream.complete(target, body)
        except SkinflintError as exc:
            record_side_call(self._ledger, job.ctx, self._ledger_row(
                job, target, suffix, None, (exc.status, exc.code or exc.error_type),
                (time.perf_counter() - started) * 1000))
            raise
        usage = Usage.from_openai(completion.body.get("usage"))
        row = self._ledger_row(job, target, suffix, usage, (200, ""),
                               (time.perf_counter() - started) * 1000)
        return completion, row

    def _ledger_row(self, job: _Job, target: Target, suffix: str, usage: Usage | None,
                    outcome: tuple[int, str], ms: float) -> LedgerRecord:
        ctx = job.ctx
        return side_call_row(ctx, target, ctx.request_id + suffix, SHADOW_CALL, usage, outcome,
                             ms, self._catalog)

    async def _score(self, job: _Job, reference: str, answer: str) -> float:
        judge = job.policy.judge
        if judge == "exact":
            return exact_score(reference, answer)
        if judge == "similarity":
            return await self._similarity(reference, answer)
        if exact_score(reference, answer) == 1.0:
            return 1.0  # no need to ask
        messages = [{"role": "system", "content": _JUDGE_PROMPT},
                    {"role": "user", "content": f"Answer A:\n{reference}\n\nAnswer B:\n{answer}"}]
        body: JSON = {"messages": messages, "temperature": 0, "max_tokens": 3}
        verdict, row = await self._call(job, self._upstream.resolve(judge), body,
                                        ".shadow.judge")
        record_side_call(self._ledger, job.ctx, row)
        return float(answer_text(verdict.body).strip().upper().startswith("YES"))

    async def _similarity(self, reference: str, answer: str) -> float:
        if is_structured(reference) or is_structured(answer):
            return exact_score(reference, answer)
        if self._vector is not None:
            a, b = await self._vector(reference), await self._vector(answer)
            if a is not None and b is not None:
                return cosine([float(x) for x in a], [float(x) for x in b])
        return word_cosine(reference, answer)

    async def _add(self, job: _Job, score: float) -> None:
        feature, policy = job.ctx.feature, job.policy
        if self._alerts is None:
            for strategy in job.strategies:
                await self._apply(feature, strategy, score, policy.floor, policy.min_samples)
            return
        try:
            for strategy in job.strategies:
                await self._alerts.add_score(f"{feature}/{strategy}", score, policy.floor,
                                             policy.min_samples)
        except Exception:  # a sample lost, as a failed call loses one
            log.exception("shadow guard: the sample of %s was not logged", job.ctx.request_id)
            self._count("failed")
            return
        try:
            await self.sync()
        except Exception:  # logged: the next round applies it
            log.exception("shadow guard: reading the shared samples failed")

    async def _apply(self, feature: str, strategy: str, score: float | None, floor: float,
                     min_samples: int, *, decide: bool = True) -> None:
        """One sample (None: an operator's re-enable) added to the test, which may switch the
        strategy off."""
        key = (feature, strategy)
        if score is None:
            self._restart(key)
            return
        watch = self._watches.setdefault(key, _Watch(Window()))
        watch.floor, watch.min_samples = floor, min_samples
        watch.window.add(score, floor)
        if decide:
            await self._decide(feature, strategy, watch)

    async def _decide(self, feature: str, strategy: str, watch: _Watch) -> None:
        if (feature, strategy) in self._off or watch.floor is None:
            return
        why = watch.window.below(watch.floor, watch.min_samples)
        if why is not None:
            await self._switch_off(feature, strategy, watch, watch.floor, why)

    async def _switch_off(self, feature: str, strategy: str, watch: _Watch,
                          floor: float, why: str) -> None:
        self._off.add((feature, strategy))
        self._metrics.shadow_off.set(len(self._off))
        watch.off_since = time.time()
        recorded = self._alerts is None
        if self._alerts is not None:
            try:  # every process applying the samples decides so; one records it
                recorded = await self._alerts.fire(
                    self._event(feature, strategy, watch.off_since, None))
                self._stored_off.add((feature, strategy))  # open now, by this one or another
            except Exception:  # the switch holds; only its record is lost, and said so
                log.exception("shadow guard: the alert for %s/%s was not recorded", feature,
                              strategy)
        w = watch.window
        log.log(
            logging.WARNING if recorded else logging.INFO,
            "shadow guard: %s switched off for feature %r: its mean score is below the floor"
            " %.3f (%s; mean %.3f over the last %d samples); enable it again with POST"
            " /api/shadow/enable", strategy, feature, floor, why, w.mean, w.samples)

    @staticmethod
    def _event(feature: str, strategy: str, start: float, end: float | None) -> AlertEvent:
        return AlertEvent(ALERT_RULE, _PER, f"{feature}/{strategy}", start, end, 0.0, 0.0)

    def _count(self, outcome: str) -> None:
        self._metrics.child(self._metrics.shadow_calls, outcome).inc()
