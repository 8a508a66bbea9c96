"""The job store (:class:`~skinflint.interfaces.JobStore`) in SQL, for SQLite and PostgreSQL.

One thread per store (:mod:`skinflint.storage.job_thread`) owns the connection and runs every
operation in a transaction of its own,
except writes that may share one: the enqueues (and lookups) that arrived while the last
transaction ran are applied together, in one transaction (group commit: under load, one commit
makes a thousand deferred requests durable). Each caller waits for its own operation's commit;
nothing blocks the event loop. PostgreSQL is driven the same way (psycopg's synchronous
connection in that thread), with the same statements, so both behave alike.

Tables: ``jobs`` (one row per job, its body and result), ``job_batches`` (the provider batches
jobs were claimed into, written before the batch is sent), ``job_lease`` (which process sends
and polls), ``job_files`` and ``job_client_batches`` (the pass-through API).

Retention (:meth:`JobTables.purge`) deletes what has ended, a bounded number of rows per
transaction, so that a large purge never holds the write lock for long.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Collection, Iterator, Sequence
from dataclasses import astuple, fields
from typing import Any, Literal, Protocol

import orjson

from skinflint.interfaces import (
    FINISHED,
    RETRYING,
    ClientBatch,
    GroupCounts,
    Job,
    JobResult,
    ListedFile,
    ProviderBatch,
    Purged,
    QueuedGroup,
    StoredFile,
)

__all__ = ["Connection", "Dialect", "FileDeletion", "JobTables", "added_columns", "schema"]

Dialect = Literal["sqlite", "postgres"]
FileDeletion = Literal["deleted", "in_use", "missing"]

_JOB_COLUMNS = [f.name for f in fields(Job)]
_AS_ROW = operator.attrgetter(*_JOB_COLUMNS)  # far faster than dataclasses.astuple
_JOB_SELECT = "SELECT {} FROM jobs".format(", ".join(f'"{c}"' for c in _JOB_COLUMNS))
_FINISHED = ", ".join(f"'{s}'" for s in sorted(FINISHED))
_OPEN = "'queued', 'submitted'"
_CHUNK = 500  # ids per IN (...) list
LEASE = "batches"


def _types(dialect: Dialect) -> tuple[str, str]:
    return ("REAL", "BLOB") if dialect == "sqlite" else ("DOUBLE PRECISION", "BYTEA")


def _added(dialect: Dialect) -> dict[str, str]:
    """The jobs table's columns added since it was first made, with the value of earlier rows."""
    real, _ = _types(dialect)
    return {"cache_key": "TEXT NOT NULL DEFAULT ''", "cache_ttl": f"{real} NOT NULL DEFAULT 0"}


def added_columns(dialect: Dialect, have: Collection[str]) -> list[str]:
    """The statements that give a jobs table made earlier, with columns ``have``, the columns
    added since."""
    return [f'ALTER TABLE jobs ADD COLUMN "{name}" {typed}'
            for name, typed in _added(dialect).items() if name not in have]


def schema(dialect: Dialect) -> list[str]:
    """The statements that create the tables (idempotent); see :func:`added_columns` for a
    table made earlier."""
    real, blob = _types(dialect)
    types = {"body": blob, "response": blob, "created": real, "due": real, "finished": real,
             **_added(dialect)}
    columns = ", ".join(f'"{c}" {types.get(c, "TEXT")}' for c in _JOB_COLUMNS)
    return [
        f"CREATE TABLE IF NOT EXISTS jobs ({columns}, PRIMARY KEY (id))",
        "CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (provider, provider_model, \"group\","
        " due) WHERE state = 'queued'",
        "CREATE INDEX IF NOT EXISTS jobs_batch ON jobs (batch) WHERE batch <> ''",
        "CREATE INDEX IF NOT EXISTS jobs_group ON jobs (\"group\") WHERE \"group\" <> ''",
        f"CREATE INDEX IF NOT EXISTS jobs_ended ON jobs (finished) WHERE state IN ({_FINISHED})",
        f"CREATE INDEX IF NOT EXISTS jobs_open ON jobs (state) WHERE state IN ({_OPEN})",
        f"CREATE TABLE IF NOT EXISTS job_batches (id TEXT PRIMARY KEY, provider TEXT,"
        f" model TEXT, \"group\" TEXT, created {real}, provider_id TEXT,"
        f" done INTEGER NOT NULL DEFAULT 0)",
        "CREATE INDEX IF NOT EXISTS job_batches_open ON job_batches (created) WHERE done = 0",
        f"CREATE TABLE IF NOT EXISTS job_lease (name TEXT PRIMARY KEY, owner TEXT,"
        f" expires {real})",
        f"CREATE TABLE IF NOT EXISTS job_files (id TEXT PRIMARY KEY, tenant TEXT, feature TEXT,"
        f" \"user\" TEXT, purpose TEXT, filename TEXT, content {blob}, created {real})",
        "CREATE INDEX IF NOT EXISTS job_files_tenant ON job_files (tenant, created)",
        "CREATE INDEX IF NOT EXISTS job_files_created ON job_files (created)",
        f"CREATE TABLE IF NOT EXISTS job_client_batches (id TEXT PRIMARY KEY, tenant TEXT,"
        f" input_file_id TEXT, endpoint TEXT, completion_window TEXT, metadata TEXT,"
        f" created {real}, cancelled {real})",
        "CREATE INDEX IF NOT EXISTS job_client_batches_tenant ON job_client_batches (tenant,"
        " created)",
        "CREATE INDEX IF NOT EXISTS job_client_batches_file ON job_client_batches"
        " (input_file_id)",
    ]


class Connection(Protocol):
    """What the tables need of a connection: statements inside :meth:`transaction`."""

    def transaction(self, *, write: bool = True) -> contextlib.AbstractContextManager[None]:
        """All or nothing; ``write``: it may write (SQLite takes the write lock first)."""
        ...

    def run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def reclaim(self, pages: int) -> bool:
        """Give up to ``pages`` free pages back to the file system, inside the transaction,
        where the database does that on request; whether free pages are left to give."""
        ...

    def close(self) -> None: ...


def _job(row: Sequence[Any]) -> Job:
    job = Job(*row)
    job.body = bytes(job.body)
    if job.response is not None:
        job.response = bytes(job.response)
    return job


_BATCH_SELECT = ("SELECT id, tenant, input_file_id, endpoint, completion_window, metadata,"
                 " created, cancelled FROM job_client_batches")


def _client_batch(found: Sequence[Any]) -> ClientBatch:
    row = list(found)
    row[5] = None if row[5] is None else orjson.loads(row[5])
    return ClientBatch(*row)


def _chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i:i + _CHUNK]


class JobTables:
    """The store's operations, each run inside a transaction of ``conn`` (blocking)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def enqueue(self, jobs: Sequence[Job]) -> None:
        marks = ", ".join("?" for _ in _JOB_COLUMNS)
        cols = ", ".join(f'"{c}"' for c in _JOB_COLUMNS)
        self.conn.many(f"INSERT INTO jobs ({cols}) VALUES ({marks})", [_AS_ROW(j) for j in jobs])

    def get(self, job_id: str) -> Job | None:
        rows = self.conn.run(f"{_JOB_SELECT} WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def queued(self) -> list[QueuedGroup]:
        rows = self.conn.run(
            'SELECT provider, provider_model, "group", COUNT(*), MIN(due) FROM jobs'
            " WHERE state = 'queued' GROUP BY provider, provider_model, \"group\"")
        return [QueuedGroup(p, m, g, int(n), float(d)) for p, m, g, n, d in rows]

    def claim(self, batch: ProviderBatch, limit: int) -> list[Job]:
        self.conn.run(
            "UPDATE jobs SET state = 'submitted', batch = ? WHERE id IN (SELECT id FROM jobs"
            " WHERE state = 'queued' AND provider = ? AND provider_model = ? AND \"group\" = ?"
            " ORDER BY due LIMIT ?)",
            (batch.id, batch.provider, batch.model, batch.group, limit))
        claimed = self.batch_jobs(batch.id)
        if claimed:  # a batch of no job is not recorded
            self.conn.run("INSERT INTO job_batches (id, provider, model, \"group\", created,"
                          " provider_id) VALUES (?, ?, ?, ?, ?, ?)", astuple(batch))
        return claimed

    def submitted(self, batch_id: str, provider_id: str) -> None:
        self.conn.run("UPDATE job_batches SET provider_id = ? WHERE id = ?",
                      (provider_id, batch_id))

    def unfinished(self) -> list[ProviderBatch]:
        rows = self.conn.run(
            "SELECT id, provider, model, \"group\", created, provider_id FROM job_batches"
            " WHERE done = 0 ORDER BY created, id")
        return [ProviderBatch(*row) for row in rows]

    def batch_jobs(self, batch_id: str) -> list[Job]:
        return [_job(r) for r in self.conn.run(f"{_JOB_SELECT} WHERE batch = ? ORDER BY due, id",
                                               (batch_id,))]

    def requeue(self, batch_id: str) -> int:
        back = self.conn.run(f"SELECT id FROM jobs WHERE batch = ? AND state NOT IN ({_FINISHED})",
                             (batch_id,))
        self.conn.run(f"UPDATE jobs SET state = 'queued', batch = '' WHERE batch = ? AND state"
                      f" NOT IN ({_FINISHED})", (batch_id,))
        self.conn.run("DELETE FROM job_batches WHERE id = ?", (batch_id,))
        return len(back)

    def retrying(self, job_ids: Sequence[str]) -> None:
        for chunk in _chunks(list(job_ids)):
            marks = ", ".join("?" for _ in chunk)
            self.conn.run(f"UPDATE jobs SET error = ?, message = '' WHERE id IN ({marks})"
                          f" AND state NOT IN ({_FINISHED})", (RETRYING, *chunk))

    def finish(self, results: Sequence[JobResult], now: float) -> list[Job]:
        by_id = {r.job_id: r for r in results}
        open_ids: list[str] = []
        for chunk in _chunks(list(by_id)):
            marks = ", ".join("?" for _ in chunk)
            open_ids += [r[0] for r in self.conn.run(
                f"SELECT id FROM jobs WHERE id IN ({marks}) AND state NOT IN ({_FINISHED})",
                tuple(chunk))]
        rows = [(by_id[i].state, by_id[i].response, by_id[i].error, by_id[i].message, now, i)
                for i in open_ids]
        self.conn.many("UPDATE jobs SET state = ?, response = ?, error = ?, message = ?,"
                       " finished = ? WHERE id = ?", rows)
        finished = self._jobs(open_ids)
        self._close_batches({j.batch for j in finished if j.batch})
        return finished

    def _close_batches(self, batch_ids: set[str]) -> None:
        """Mark done the batches none of whose jobs is left to finish."""
        self.conn.many(
            f"UPDATE job_batches SET done = 1 WHERE id = ? AND NOT EXISTS (SELECT 1 FROM jobs"
            f" WHERE batch = ? AND state NOT IN ({_FINISHED}))",
            [(b, b) for b in sorted(batch_ids)])

    def _jobs(self, ids: Sequence[str]) -> list[Job]:
        found: list[Job] = []
        for chunk in _chunks(ids):
            marks = ", ".join("?" for _ in chunk)
            found += [_job(r) for r in self.conn.run(f"{_JOB_SELECT} WHERE id IN ({marks})",
                                                     tuple(chunk))]
        order = {i: n for n, i in enumerate(ids)}
        return sorted(found, key=lambda j: order[j.id])

    def lease(self, owner: str, ttl: float, now: float) -> bool:
        self.conn.run(
            "INSERT INTO job_lease (name, owner, expires) VALUES (?, ?, ?) ON CONFLICT (name)"
            " DO UPDATE SET owner = excluded.owner, expires = excluded.expires"
            " WHERE job_lease.owner = excluded.owner OR job_lease.expires < ?",
            (LEASE, owner, now + ttl, now))
        rows = self.conn.run("SELECT owner FROM job_lease WHERE name = ?", (LEASE,))
        return bool(rows) and rows[0][0] == owner

    def release(self, owner: str) -> None:
        self.conn.run("DELETE FROM job_lease WHERE name = ? AND owner = ?", (LEASE, owner))

    def lease_holder(self) -> str | None:
        rows = self.conn.run("SELECT owner FROM job_lease WHERE name = ?", (LEASE,))
        return str(rows[0][0]) if rows else None

    def put_file(self, file: StoredFile) -> None:
        self.conn.run("INSERT INTO job_files (id, tenant, feature, \"user\", purpose, filename,"
                      " content, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", astuple(file))

    def get_file(self, file_id: str) -> StoredFile | None:
        rows = self.conn.run("SELECT id, tenant, feature, \"user\", purpose, filename, content,"
                             " created FROM job_files WHERE id = ?", (file_id,))
        if not rows:
            return None
        row = list(rows[0])
        row[6] = bytes(row[6])
        return StoredFile(*row)

    def put_batch(self, batch: ClientBatch, jobs: Sequence[Job]) -> None:
        meta = None if batch.metadata is None else orjson.dumps(batch.metadata).decode()
        self.conn.run(
            "INSERT INTO job_client_batches (id, tenant, input_file_id, endpoint,"
            " completion_window, metadata, created, cancelled) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (batch.id, batch.tenant, batch.input_file_id, batch.endpoint,
             batch.completion_window, meta, batch.created, batch.cancelled))
        self.enqueue(jobs)

    def get_batch(self, batch_id: str) -> ClientBatch | None:
        rows = self.conn.run(f"{_BATCH_SELECT} WHERE id = ?", (batch_id,))
        return _client_batch(rows[0]) if rows else None

    def tenant_batches(self, tenant: str, after: str, limit: int) -> list[ClientBatch]:
        if after:
            rows = self.conn.run(
                f"{_BATCH_SELECT} WHERE tenant = ? AND (created < (SELECT created FROM"
                " job_client_batches WHERE id = ?) OR (created = (SELECT created FROM"
                " job_client_batches WHERE id = ?) AND id < ?)) ORDER BY created DESC, id DESC"
                " LIMIT ?", (tenant, after, after, after, limit))
        else:
            rows = self.conn.run(f"{_BATCH_SELECT} WHERE tenant = ? ORDER BY created DESC,"
                                 " id DESC LIMIT ?", (tenant, limit))
        return [_client_batch(r) for r in rows]

    def cancel_batch(self, batch_id: str, now: float) -> list[Job]:
        self.conn.run("UPDATE job_client_batches SET cancelled = ? WHERE id = ? AND cancelled = 0",
                      (now, batch_id))
        ids = [r[0] for r in self.conn.run(
            "SELECT id FROM jobs WHERE \"group\" = ? AND state = 'queued'", (batch_id,))]
        self.conn.many("UPDATE jobs SET state = 'cancelled', error = 'cancelled', message = ?,"
                       " finished = ? WHERE id = ?",
                       [("the batch was cancelled before this line was sent", now, i)
                        for i in ids])
        return self._jobs(ids)

    def group_jobs(self, group: str) -> list[Job]:
        return [_job(r) for r in self.conn.run(
            f"{_JOB_SELECT} WHERE \"group\" = ? ORDER BY created, id", (group,))]

    def group_counts(self, group: str) -> GroupCounts:
        counts: dict[str, int] = {}
        last = 0.0
        for state, error, n, finished in self.conn.run(
                "SELECT state, error, COUNT(*), MAX(finished) FROM jobs WHERE \"group\" = ?"
                " GROUP BY state, error", (group,)):
            counts[state] = counts.get(state, 0) + int(n)
            if state == "failed" and error == "expired":
                counts["expired"] = counts.get("expired", 0) + int(n)
            last = max(last, float(finished or 0.0))
        return GroupCounts(**counts, last_finished=last)

    def waiting(self) -> dict[str, int]:
        return {str(state): int(n) for state, n in self.conn.run(
            f"SELECT state, COUNT(*) FROM jobs WHERE state IN ({_OPEN}) GROUP BY state")}

    def tenant_files(self, tenant: str, purpose: str, after: str, limit: int,
                     newest_first: bool = True) -> list[ListedFile]:
        where, params = "tenant = ?", [tenant]
        if purpose:
            where, params = where + " AND purpose = ?", [*params, purpose]
        less, order = ("<", "DESC") if newest_first else (">", "ASC")
        if after:
            where += (f" AND (created, id) {less} (SELECT created, id FROM job_files WHERE"
                      " id = ? AND tenant = ?)")
            params += [after, tenant]
        rows = self.conn.run(
            f"SELECT id, purpose, filename, length(content), created FROM job_files WHERE"
            f" {where} ORDER BY created {order}, id {order} LIMIT ?", (*params, limit))
        return [ListedFile(i, p, n, int(size or 0), float(c)) for i, p, n, size, c in rows]

    def delete_file(self, file_id: str, tenant: str) -> FileDeletion:
        found = self.conn.run("SELECT tenant FROM job_files WHERE id = ?", (file_id,))
        if not found or found[0][0] != tenant:
            return "missing"
        if self.conn.run(
                "SELECT 1 FROM job_client_batches b WHERE b.input_file_id = ? AND EXISTS"
                " (SELECT 1 FROM jobs j WHERE j.\"group\" = b.id AND j.\"group\" <> ''"
                f" AND j.state IN ({_OPEN})) LIMIT 1", (file_id,)):
            return "in_use"
        self.conn.run("DELETE FROM job_files WHERE id = ?", (file_id,))
        return "deleted"

    def purge(self, before: float, limit: int) -> Purged:
        """See :meth:`skinflint.interfaces.JobStore.purge`. The batches go first, so that
        their jobs and input files can follow in the same pass."""
        batches = self._deleted(
            "job_client_batches", "SELECT b.id FROM job_client_batches b WHERE b.created < ?"
            " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.\"group\" = b.id AND"
            f" j.\"group\" <> '' AND (j.state NOT IN ({_FINISHED}) OR j.finished >= ?))"
            " LIMIT ?", (before, before, limit))
        jobs = self._deleted(
            "jobs", f"SELECT j.id FROM jobs j WHERE j.state IN ({_FINISHED}) AND j.finished < ?"
            " AND (j.\"group\" = '' OR NOT EXISTS (SELECT 1 FROM job_client_batches b WHERE"
            " b.id = j.\"group\")) LIMIT ?", (before, limit))
        provider_batches = self._deleted(
            "job_batches", "SELECT id FROM job_batches WHERE done = 1 AND created < ? LIMIT ?",
            (before, limit))
        files = self._deleted(
            "job_files", "SELECT f.id FROM job_files f WHERE f.created < ? AND NOT EXISTS"
            " (SELECT 1 FROM job_client_batches b WHERE b.input_file_id = f.id) LIMIT ?",
            (before, limit))
        return Purged(jobs, files, batches, provider_batches)

    def _deleted(self, table: str, select: str, params: Sequence[Any]) -> int:
        """Delete the rows of ``table`` whose ids ``select`` finds; how many."""
        return len(self.conn.run(f"DELETE FROM {table} WHERE id IN ({select}) RETURNING id",
                                 params))

    def reclaim(self, pages: int) -> bool:
        return self.conn.reclaim(pages)
