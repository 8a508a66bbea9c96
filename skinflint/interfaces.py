"""The narrow interfaces between the pipeline and everything that does I/O.

Each concern has one Protocol; implementations live in ``providers/`` and ``storage/`` and
never import each other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from skinflint.models import (
    BatchLine,
    BatchOutcome,
    BatchStatus,
    Completion,
    LedgerRecord,
    StreamChunk,
    UpstreamRequest,
)

__all__ = [
    "FINISHED",
    "RETRYING",
    "Admission",
    "Amounts",
    "BatchAPI",
    "BudgetCounters",
    "CacheEntry",
    "CacheStore",
    "Claim",
    "ClientBatch",
    "CounterRow",
    "GroupCounts",
    "InvalidationFeed",
    "Job",
    "JobResult",
    "JobState",
    "JobStore",
    "Ledger",
    "Limits",
    "ListedFile",
    "Provider",
    "ProviderBatch",
    "Purged",
    "QueuedGroup",
    "SemanticIndex",
    "StoredFile",
    "Vector",
]

Vector = npt.NDArray[np.float32]


class Provider(Protocol):
    """An upstream LLM API. Raises :class:`skinflint.errors.UpstreamError` subclasses only."""

    name: str

    async def complete(self, request: UpstreamRequest) -> Completion:
        """One non-streaming chat completion, returned in the OpenAI format."""
        ...

    def stream(self, request: UpstreamRequest) -> AsyncIterator[StreamChunk]:
        """A streaming chat completion as OpenAI ``chat.completion.chunk`` objects.

        The last chunk carries ``usage`` whenever the provider reports it."""
        ...

    async def embed(self, request: UpstreamRequest) -> Completion:
        """An embeddings call, returned in the OpenAI format."""
        ...

    async def list_models(self, timeout: float) -> list[dict[str, Any]]:
        """The models the upstream offers, as OpenAI ``model`` objects (each has an ``id``)."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class BatchAPI(Protocol):
    """A provider's discounted batch API (OpenAI files + batches, Anthropic message batches),
    offered by the providers that have one. Raises :class:`skinflint.errors.UpstreamError`
    subclasses only. Lines and results are in the OpenAI chat-completions format whatever the
    provider's own."""

    async def submit_batch(self, lines: Sequence[BatchLine], timeout: float) -> str:
        """Send ``lines`` as one batch; the provider's batch id."""
        ...

    async def batch_status(self, batch_id: str, timeout: float) -> BatchStatus: ...

    async def batch_results(self, batch_id: str, timeout: float) -> list[BatchOutcome]:
        """Every line's outcome, once :meth:`batch_status` says ``ended``."""
        ...

    async def cancel_batch(self, batch_id: str, timeout: float) -> None: ...


@dataclass(slots=True)
class CacheEntry:
    key: str
    value: bytes
    expires_at: float  # unix seconds; 0 = never
    tags: tuple[str, ...] = ()


class CacheStore(Protocol):
    """Key -> bytes with expiry and tags. Implementations: memory, sqlite (tiered), redis."""

    async def get(self, key: str, now: float) -> bytes | None: ...

    async def set(self, entry: CacheEntry) -> None: ...

    async def invalidate_tags(self, tags: Sequence[str]) -> int:
        """Drop every entry carrying any of ``tags``; returns how many were dropped."""
        ...

    async def stats(self) -> dict[str, int]: ...

    async def close(self) -> None: ...


@runtime_checkable
class InvalidationFeed(Protocol):
    """A cache store that keeps entries in this process's memory in front of storage other
    processes share (``serve --workers``, the CLI): their invalidations reach this process
    through the storage. The exact-cache stage follows it every ``poll_seconds``."""

    poll_seconds: float

    async def invalidations(self) -> list[tuple[str, ...]] | None:
        """The tags other processes invalidated since the last call; None when some could not
        be told, so that everything held in memory must go."""
        ...

    async def forget_tags(self, tags: Sequence[str] | None) -> None:
        """Apply one of those invalidations here (``None``: drop everything in memory)."""
        ...

    async def applied(self) -> None:
        """Record, for the others to see, that everything returned so far has been applied."""
        ...


class Ledger(Protocol):
    """Append-only request ledger. ``record`` never blocks and never raises."""

    def record(self, record: LedgerRecord) -> None: ...

    def flush(self) -> None:
        """Write everything recorded so far (blocking; call off the event loop or at exit)."""
        ...

    def query(self, since: float = 0.0) -> Iterable[LedgerRecord]:
        """Every record with ``ts >= since``, oldest first (blocking: iterate it off the event
        loop; a database ledger reads it a part at a time as it is iterated)."""
        ...

    def close(self) -> None: ...


class SemanticIndex(Protocol):
    """Questions and their embeddings, searched within one partition (scope, model, parameters
    and preceding context). ``key`` is the exact-cache key of the stored answer. Embedded
    (numpy + SQLite) and PostgreSQL (pgvector) implementations."""

    async def search(self, partition: str, vector: Vector, k: int) -> list[tuple[str, float, str]]:
        """Up to ``k`` (key, cosine similarity, question) triples, most similar first."""
        ...

    async def add(self, partition: str, key: str, text: str, vector: Vector) -> None: ...

    async def touch(self, key: str) -> None:
        """Mark an entry used (capacity eviction drops the least recently used)."""
        ...

    async def remove(self, key: str) -> None: ...

    async def count(self) -> int: ...

    async def close(self) -> None: ...


class Amounts(NamedTuple):
    """What a budget counts: USD, requests, tokens (input + output). Tuples, not dataclasses,
    because several are built for every request."""

    usd: float = 0.0
    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class Limits:
    """A budget's limits per window; None: that amount is not limited."""

    usd: float | None = None
    requests: int | None = None
    tokens: int | None = None

    def used(self, committed: Amounts) -> float:
        """The largest fraction of a limit that ``committed`` takes (inf past a zero limit)."""
        return self.ratio(committed.usd, committed.requests, committed.tokens)

    def ratio(self, usd: float, requests: int, tokens: int) -> float:
        """:meth:`used` of these amounts."""
        most = 0.0
        if self.usd is not None:
            most = usd / self.usd if self.usd else (float("inf") if usd else 0.0)
        if self.requests is not None:
            most = max(most, requests / self.requests if self.requests
                       else (float("inf") if requests else 0.0))
        if self.tokens is not None:
            most = max(most, tokens / self.tokens if self.tokens
                       else (float("inf") if tokens else 0.0))
        return most

    def allows(self, usd: float, requests: int, tokens: int) -> bool:
        """True when these amounts stay within every limit (USD to a millionth of a cent)."""
        return ((self.usd is None or usd <= self.usd + 1e-8)
                and (self.requests is None or requests <= self.requests)
                and (self.tokens is None or tokens <= self.tokens))


class Claim(NamedTuple):
    """One budget's counter as a request meets it: the counter (budget, subject, window),
    the budget's limits, what the request may cost at most, and whether passing the limit
    refuses the request (``hard``) or only reports it."""

    budget: str
    subject: str
    window_start: float  # unix seconds, UTC calendar window
    window_end: float
    limits: Limits
    amount: Amounts
    hard: bool = True


class Admission(NamedTuple):
    """The outcome of :meth:`BudgetCounters.reserve`. ``blocked``: the index of the first hard
    claim the request would take past its limit; then nothing was reserved and ``before`` and
    ``after`` are empty. Else, per claim, :meth:`Limits.used` of spent + reserved before and
    after the reservation."""

    blocked: int | None
    before: tuple[float, ...]
    after: tuple[float, ...]


class CounterRow(NamedTuple):
    budget: str
    subject: str
    window_start: float
    window_end: float
    spent: Amounts
    reserved: Amounts


class BudgetCounters(Protocol):
    """Budget and rate-limit counters shared by every process that serves the same budgets.
    Implementations: memory (one process), SQLite (``serve --workers N``), Redis (replicas).
    Counters whose window has ended are dropped."""

    async def reserve(self, claims: Sequence[Claim], now: float) -> Admission:
        """Atomically, for all ``claims`` at once: unless a hard claim would pass its limit,
        add each claim's amount to its counter's reserved amounts."""
        ...

    def settle(self, claims: Sequence[Claim], actual: Amounts) -> None:
        """Replace what ``claims`` reserved by what the request ``actual``-ly spent (all zero
        releases it). Never blocks: a shared store applies it in the background, before this
        process's next :meth:`snapshot` (a later :meth:`reserve` may not see it yet, which
        only errs on the safe side)."""
        ...

    async def snapshot(self, now: float) -> list[CounterRow]:
        """The counters of windows not yet ended."""
        ...

    async def close(self) -> None: ...


# ---- deferred requests and passed-through batches

JobState = Literal["queued", "submitted", "completed", "failed", "cancelled"]
#: The ``error`` of a job whose line's real-time retry is under way (its state: submitted).
RETRYING = "realtime_retry"
#: The states a job ends in.
FINISHED: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


@dataclass(slots=True)
class Job:
    """One chat request to be answered through a provider batch: a deferred request (``group``
    empty) or a line of a passed-through batch (``group``: the client's batch id, ``custom_id``
    the line's own). ``body`` is the client's JSON body as sent (never a key); the request's
    attribution travels with it. ``due`` is when it must be sent at the latest.
    ``cache_key``: where the exact cache stores a deferred request's answer when it arrives,
    for ``cache_ttl`` seconds (0: no expiry); empty when it is not stored."""

    id: str
    tenant: str
    feature: str
    user: str
    request_id: str
    requested_model: str
    provider: str
    provider_model: str
    body: bytes
    created: float
    due: float
    group: str = ""
    custom_id: str = ""
    state: JobState = "queued"
    batch: str = ""  # the gateway's id of the provider batch it was claimed into
    response: bytes | None = None  # the chat.completion JSON, once completed
    error: str = ""  # failed or cancelled: expired | cancelled | failed | realtime_failed
    message: str = ""
    finished: float = 0.0
    cache_key: str = ""
    cache_ttl: float = 0.0


@dataclass(frozen=True, slots=True)
class JobResult:
    """What a finished job is recorded with (see :class:`Job`)."""

    job_id: str
    state: Literal["completed", "failed", "cancelled"]
    response: bytes | None = None
    error: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class ProviderBatch:
    """A provider batch as the gateway tracks it. It is written (``provider_id`` empty) with
    its jobs claimed before it is sent: an intent that a restart reconciles."""

    id: str
    provider: str
    model: str  # the provider's model name
    group: str
    created: float
    provider_id: str = ""  # empty: not known to be sent yet


class QueuedGroup(NamedTuple):
    """Jobs waiting to be sent, for one provider, model and group: how many, and the earliest
    time one of them is due."""

    provider: str
    model: str
    group: str
    jobs: int
    due: float


@dataclass(frozen=True, slots=True)
class GroupCounts:
    """How many jobs of a passed-through batch are in each state (``expired``: those failed
    because their line expired), and when the last one finished."""

    queued: int = 0
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    last_finished: float = 0.0

    @property
    def total(self) -> int:
        return self.queued + self.submitted + self.completed + self.failed + self.cancelled

    @property
    def open(self) -> int:
        return self.queued + self.submitted


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file a client uploaded (``POST /v1/files``), kept for its tenant with the attribution
    of the upload."""

    id: str
    tenant: str
    feature: str
    user: str
    purpose: str
    filename: str
    content: bytes
    created: float


class ListedFile(NamedTuple):
    """An uploaded file as a listing shows it (its size, not its content)."""

    id: str
    purpose: str
    filename: str
    size: int
    created: float


class Purged(NamedTuple):
    """What one pass of the job store's retention deleted."""

    jobs: int = 0
    files: int = 0
    batches: int = 0  # passed-through batches
    provider_batches: int = 0

    @property
    def total(self) -> int:
        return self.jobs + self.files + self.batches + self.provider_batches


@dataclass(frozen=True, slots=True)
class ClientBatch:
    """A passed-through batch as the client created it (``POST /v1/batches``); its jobs carry
    its id as their ``group``."""

    id: str
    tenant: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None
    created: float
    cancelled: float = 0.0  # when the client asked to cancel it (0: not asked)


class JobStore(Protocol):
    """Durable jobs, the provider batches they are sent in, and the files and batches of the
    pass-through API. Implementations: SQLite (shared by ``serve --workers N``), PostgreSQL
    (replicas), memory. Every write is durable when its call returns."""

    async def enqueue(self, jobs: Sequence[Job]) -> None: ...

    async def get(self, job_id: str) -> Job | None: ...

    async def queued(self) -> list[QueuedGroup]: ...

    async def claim(self, batch: ProviderBatch, limit: int) -> list[Job]:
        """Record ``batch`` and move up to ``limit`` queued jobs of its provider, model and
        group into it (earliest due first), in one transaction; the jobs claimed."""
        ...

    async def submitted(self, batch_id: str, provider_id: str) -> None:
        """The batch was accepted by its provider under ``provider_id``."""
        ...

    async def unfinished(self) -> list[ProviderBatch]:
        """Batches with a job not finished, oldest first (a restart resumes them)."""
        ...

    async def batch_jobs(self, batch_id: str) -> list[Job]: ...

    async def requeue(self, batch_id: str) -> int:
        """Give a batch's unfinished jobs back to the queue and forget the batch (it never
        reached its provider); how many were given back."""
        ...

    async def retrying(self, job_ids: Sequence[str]) -> None:
        """Mark unfinished jobs whose failed line is about to be retried in real time, before
        the calls: a job still marked when it is settled again (the process stopped before
        recording its result) may have been answered and billed, so it is not asked again."""
        ...

    async def finish(self, results: Sequence[JobResult], now: float) -> list[Job]:
        """Record results of jobs not finished yet; the jobs this call finished, as finished
        (a result for a job already finished is ignored: nothing is counted twice)."""
        ...

    async def lease(self, owner: str, ttl: float, now: float) -> bool:
        """Take or renew the right to send and poll batches for ``ttl`` seconds; False when
        another owner holds it."""
        ...

    async def release(self, owner: str) -> None: ...

    async def lease_holder(self) -> str | None:
        """Who holds the lease (or held it last); None when nobody does."""
        ...

    async def put_file(self, file: StoredFile) -> None: ...

    async def get_file(self, file_id: str) -> StoredFile | None: ...

    async def tenant_files(self, tenant: str, purpose: str, after: str, limit: int,
                           newest_first: bool = True) -> list[ListedFile]:
        """A tenant's uploaded files (of ``purpose``; empty: any), newest first (or oldest
        first), from the one after ``after`` (a file id; empty: from the first), at most
        ``limit``."""
        ...

    async def delete_file(self, file_id: str, tenant: str) -> Literal["deleted", "in_use",
                                                                       "missing"]:
        """Delete ``tenant``'s file, unless a batch made from it has a job not finished
        (``in_use``); ``missing``: no such file of that tenant."""
        ...

    async def put_batch(self, batch: ClientBatch, jobs: Sequence[Job]) -> None:
        """Record a passed-through batch and enqueue its jobs, in one transaction."""
        ...

    async def get_batch(self, batch_id: str) -> ClientBatch | None: ...

    async def tenant_batches(self, tenant: str, after: str, limit: int) -> list[ClientBatch]:
        """A tenant's passed-through batches, newest first, from the one after ``after`` (a
        batch id; empty: from the newest), at most ``limit``."""
        ...

    async def cancel_batch(self, batch_id: str, now: float) -> list[Job]:
        """Mark the batch cancelled and cancel its queued jobs; those cancelled."""
        ...

    async def group_jobs(self, group: str) -> list[Job]:
        """A passed-through batch's jobs, in its input file's order."""
        ...

    async def group_counts(self, group: str) -> GroupCounts: ...

    async def waiting(self) -> dict[str, int]:
        """How many jobs are in each state not finished (``queued``, ``submitted``)."""
        ...

    async def purge(self, before: float, limit: int) -> Purged:
        """Delete, in one transaction, at most ``limit`` rows of each kind: jobs finished
        before ``before`` (never one not finished; a line of a passed-through batch goes with
        its batch), passed-through batches created before it whose jobs all finished before
        it, provider batches done and created before it, and uploaded files created before it
        that no batch left was made from. Call again while it deletes ``limit`` of a kind."""
        ...

    async def reclaim(self) -> None:
        """Give the space freed by :meth:`purge` back to the file system, in bounded steps,
        where the database is set up for that (SQLite with ``auto_vacuum=INCREMENTAL``);
        nothing otherwise."""
        ...

    async def close(self) -> None: ...
