"""The jobs, files and batches endpoints (``/v1/skinflint/jobs/{id}``, OpenAI's ``/v1/files`` and
``/v1/batches``), over the gateway's job store. Each call is scoped to the tenant of the gateway
key that makes it: another tenant's job, file or batch is not found (404).

Passed-through batches are the gateway's own: an uploaded file is kept in the job store; a
batch made from it turns each line into a job (its model resolved as a chat request's would
be), and the batch service sends them at once, one provider batch per provider and model. Its
status aggregates its jobs'; its output and error files are written from their stored results.
A file can be listed, and deleted unless a batch made from it is still running.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

import orjson

from skinflint.errors import AuthenticationError, NotFoundError, RequestError
from skinflint.interfaces import ClientBatch, GroupCounts, StoredFile
from skinflint.jobs import shapes
from skinflint.jobs.admit import admit_lines
from skinflint.jobs.service import BatchService
from skinflint.pipeline.budgets import BudgetBook
from skinflint.pipeline.context import Target
from skinflint.pipeline.defer import job_json

__all__ = ["BatchesAPI", "path_id"]

JSON = dict[str, Any]
_WINDOWS = ("24h",)
MAX_LISTED = 100  # batches a list answers at most
MAX_FILES_LISTED = 10_000  # files a list answers at most (and by default, as OpenAI's)


def path_id(path: str, prefix: str, suffix: str = "") -> str | None:
    """The id in ``prefix{id}suffix``; None when ``path`` is not of that form."""
    if not path.startswith(prefix) or not path.endswith(suffix):
        return None
    found = path[len(prefix):len(path) - len(suffix)]
    return found if found and "/" not in found else None


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str, bytes]]:
    """A multipart form's fields: name -> (filename, bytes)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise RequestError("POST /v1/files takes a multipart/form-data body",
                           code="invalid_upload")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
    fields: dict[str, tuple[str, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name] = (part.get_filename() or "", payload)
    return fields


def _limit(params: Mapping[str, list[str]], default: int, most: int) -> int:
    """The ``limit`` query parameter, from 1 to ``most``."""
    try:
        limit = int(params.get("limit", [str(default)])[0])
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        raise RequestError(f"limit must be from 1 to {most}", code="invalid_limit")
    return limit


class BatchesAPI:
    """See the module docstring. ``tenants`` maps sha256(gateway key) to its tenant (empty:
    one open tenant, ``default``)."""

    def __init__(self, service: BatchService, tenants: Mapping[str, str],
                 target: Callable[[str], Target | None], budgets: BudgetBook | None) -> None:
        self._service = service
        self._budgets = budgets
        self._store = service.store
        self._tenants = tenants
        self._target = target

    def tenant(self, headers: Mapping[str, str]) -> str:
        if not self._tenants:
            return "default"
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        tenant = self._tenants.get(hashlib.sha256(token.encode()).hexdigest()) if token else None
        if tenant is None:
            raise AuthenticationError("invalid or missing gateway key")
        return tenant

    async def job(self, headers: Mapping[str, str], job_id: str) -> bytes:
        tenant = self.tenant(headers)
        job = await self._store.get(job_id)
        if job is None or job.tenant != tenant:
            raise NotFoundError(f"no job {job_id[:64]!r}")
        response = orjson.Fragment(job.response) if job.response is not None else None
        return orjson.dumps(job_json(job, response))

    async def upload(self, headers: Mapping[str, str], raw: bytes) -> bytes:
        tenant = self.tenant(headers)
        form = _multipart(headers.get("content-type", ""), raw)
        if "file" not in form:
            raise RequestError("the form needs a 'file'", code="invalid_upload")
        purpose = form.get("purpose", ("", b""))[1].decode("utf-8", "replace")
        if purpose != "batch":
            raise RequestError("only files of purpose 'batch' are taken", code="invalid_purpose")
        filename, content = form["file"]
        f = StoredFile(shapes.new_file_id(), tenant, headers.get("x-skinflint-feature", ""),
                       headers.get("x-skinflint-user", ""), purpose, filename[:256], content,
                       time.time())
        await self._store.put_file(f)
        return orjson.dumps(shapes.file_object(f))

    async def list_files(self, headers: Mapping[str, str], query: bytes) -> bytes:
        """``GET /v1/files?purpose=&limit=&after=&order=``: the tenant's uploaded files,
        newest first unless ``order=asc`` (a batch's output and error files are reached from
        the batch)."""
        tenant = self.tenant(headers)
        params = parse_qs(query.decode("latin-1"))
        limit = _limit(params, MAX_FILES_LISTED, MAX_FILES_LISTED)
        order = params.get("order", ["desc"])[0]
        if order not in ("asc", "desc"):
            raise RequestError("order must be asc or desc", code="invalid_order")
        found = await self._store.tenant_files(
            tenant, params.get("purpose", [""])[0], params.get("after", [""])[0], limit + 1,
            newest_first=order == "desc")
        data = [shapes.listed_file_object(f) for f in found[:limit]]
        return orjson.dumps({"object": "list", "data": data,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None,
                             "has_more": len(found) > limit})

    async def delete_file(self, headers: Mapping[str, str], file_id: str) -> bytes:
        """``DELETE /v1/files/{id}``: refused (400 ``file_in_use``) while a batch made from the
        file has lines not finished."""
        tenant = self.tenant(headers)
        result = shapes.result_file(file_id)
        if result is not None:
            await self._batch(tenant, result[0])
            raise RequestError("a batch's output and error files are kept as long as the"
                               " batch", code="invalid_file")
        done = await self._store.delete_file(file_id, tenant)
        if done == "missing":
            raise NotFoundError(f"no file {file_id[:64]!r}")
        if done == "in_use":
            raise RequestError(f"file {file_id[:64]!r} is the input of a batch still running;"
                               " cancel the batch or wait for it to end", code="file_in_use")
        return orjson.dumps({"id": file_id, "object": "file", "deleted": True})

    async def file(self, headers: Mapping[str, str], file_id: str) -> bytes:
        """A file's object: an uploaded file, or a batch's output or error file."""
        found = await self._content(headers, file_id)
        if isinstance(found, StoredFile):
            return orjson.dumps(shapes.file_object(found))
        content, created = found
        return orjson.dumps(shapes.result_file_object(file_id, content, created))

    async def content(self, headers: Mapping[str, str], file_id: str) -> bytes:
        found = await self._content(headers, file_id)
        return found.content if isinstance(found, StoredFile) else found[0]

    async def _content(self, headers: Mapping[str, str],
                       file_id: str) -> StoredFile | tuple[bytes, float]:
        tenant = self.tenant(headers)
        result = shapes.result_file(file_id)
        if result is None:
            f = await self._store.get_file(file_id)
            if f is None or f.tenant != tenant:
                raise NotFoundError(f"no file {file_id[:64]!r}")
            return f
        batch = await self._batch(tenant, result[0])
        jobs = await self._store.group_jobs(batch.id)
        lines = await asyncio.to_thread(shapes.result_lines, jobs, errors=result[1])
        return lines, batch.created

    async def create(self, headers: Mapping[str, str], raw: bytes) -> bytes:
        tenant = self.tenant(headers)
        try:
            asked = orjson.loads(raw)
        except orjson.JSONDecodeError:
            asked = None
        if not isinstance(asked, dict):
            raise RequestError("request body must be a JSON object", code="invalid_json")
        if asked.get("endpoint") != shapes.CHAT_ENDPOINT:
            raise RequestError(f"'endpoint' must be {shapes.CHAT_ENDPOINT}",
                               code="invalid_endpoint")
        window = asked.get("completion_window", "24h")
        if window not in _WINDOWS:
            raise RequestError("'completion_window' must be 24h", code="invalid_window")
        metadata = asked.get("metadata")
        f = await self._store.get_file(str(asked.get("input_file_id")))
        if f is None or f.tenant != tenant:
            raise NotFoundError("input_file_id: no such file")
        batch = ClientBatch(shapes.new_batch_id(), tenant, f.id, shapes.CHAT_ENDPOINT, window,
                            metadata if isinstance(metadata, dict) else None, time.time())
        jobs = shapes.read_lines(f.content, batch.id, f, batch.created, self._target)
        await admit_lines(self._budgets, jobs)
        await self._store.put_batch(batch, jobs)
        metrics = self._service.metrics
        if metrics is not None:
            metrics.child(metrics.jobs_accepted, "batch").inc(len(jobs))
        self._service.wake()
        return orjson.dumps(shapes.batch_object(batch, GroupCounts(queued=len(jobs))))

    async def _batch(self, tenant: str, batch_id: str) -> ClientBatch:
        batch = await self._store.get_batch(batch_id)
        if batch is None or batch.tenant != tenant:
            raise NotFoundError(f"no batch {batch_id[:64]!r}")
        return batch

    async def retrieve(self, headers: Mapping[str, str], batch_id: str) -> bytes:
        batch = await self._batch(self.tenant(headers), batch_id)
        return orjson.dumps(shapes.batch_object(batch, await self._store.group_counts(batch.id)))

    async def list_batches(self, headers: Mapping[str, str], query: bytes) -> bytes:
        """``GET /v1/batches?after=&limit=``: the tenant's batches, newest first."""
        tenant = self.tenant(headers)
        params = parse_qs(query.decode("latin-1"))
        after = params.get("after", [""])[0]
        limit = _limit(params, 20, MAX_LISTED)
        found = await self._store.tenant_batches(tenant, after, limit + 1)
        data = [shapes.batch_object(b, await self._store.group_counts(b.id))
                for b in found[:limit]]
        return orjson.dumps({"object": "list", "data": data,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None,
                             "has_more": len(found) > limit})

    async def cancel(self, headers: Mapping[str, str], batch_id: str) -> bytes:
        batch = await self._batch(self.tenant(headers), batch_id)
        await self._service.cancel(batch.id)
        return await self.retrieve(headers, batch_id)
