"""OpenAI's shapes for the files and batches API, as the gateway serves them from its job store:
file objects, batch objects whose status aggregates their jobs', the batch input file's lines
read into jobs, and the output and error files written from stored results (OpenAI's batch
output format: one JSON object per line, in the input's order)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from skinflint.errors import RequestError
from skinflint.interfaces import ClientBatch, GroupCounts, Job, ListedFile, StoredFile
from skinflint.pipeline.context import Target

__all__ = [
    "CHAT_ENDPOINT",
    "batch_object",
    "error_file_id",
    "file_object",
    "listed_file_object",
    "new_batch_id",
    "new_file_id",
    "output_file_id",
    "read_lines",
    "result_lines",
]

JSON = dict[str, Any]
CHAT_ENDPOINT = "/v1/chat/completions"
_OUTPUT, _ERRORS = "file-out-", "file-err-"
MAX_LINES = 50_000  # OpenAI's own limit per batch


def new_file_id() -> str:
    return f"file-{os.urandom(12).hex()}"


def new_batch_id() -> str:
    return f"batch_{os.urandom(12).hex()}"


def output_file_id(batch_id: str) -> str:
    return _OUTPUT + batch_id


def error_file_id(batch_id: str) -> str:
    return _ERRORS + batch_id


def result_file(file_id: str) -> tuple[str, bool] | None:
    """``(batch id, errors?)`` for the id of a batch's output or error file, else None."""
    for prefix, errors in ((_OUTPUT, False), (_ERRORS, True)):
        if file_id.startswith(prefix):
            return file_id[len(prefix):], errors
    return None


def file_object(f: StoredFile) -> JSON:
    return listed_file_object(ListedFile(f.id, f.purpose, f.filename, len(f.content), f.created))


def listed_file_object(f: ListedFile) -> JSON:
    return {"id": f.id, "object": "file", "bytes": f.size, "created_at": int(f.created),
            "filename": f.filename, "purpose": f.purpose, "status": "processed"}


def result_file_object(file_id: str, content: bytes, created: float) -> JSON:
    return {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(created),
            "filename": "batch_output.jsonl" if file_id.startswith(_OUTPUT)
            else "batch_errors.jsonl", "purpose": "batch_output", "status": "processed"}


def _status(batch: ClientBatch, counts: GroupCounts) -> str:
    if batch.cancelled:
        return "cancelling" if counts.open else "cancelled"
    if not counts.open:
        expired = bool(counts.total) and counts.expired == counts.total
        return "expired" if expired else "completed"
    if counts.queued == counts.total:
        return "validating"
    return "in_progress"


def batch_object(batch: ClientBatch, counts: GroupCounts) -> JSON:
    """A batch as ``GET /v1/batches/{id}`` shows it: its status and counts aggregate its
    jobs'; its output and error files exist once it has ended."""
    status = _status(batch, counts)
    ended = status in ("completed", "cancelled", "expired")
    failed = counts.failed + counts.cancelled
    last = counts.last_finished
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint, "errors": None,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": status,
        "output_file_id": output_file_id(batch.id) if ended and counts.completed else None,
        "error_file_id": error_file_id(batch.id) if ended and failed else None,
        "created_at": int(batch.created), "expires_at": int(batch.created) + 86400,
        "in_progress_at": None, "finalizing_at": None,
        "completed_at": int(last) if status == "completed" else None,
        "failed_at": None,
        "expired_at": int(last) if status == "expired" else None,
        "cancelling_at": int(batch.cancelled) if batch.cancelled else None,
        "cancelled_at": int(last or batch.cancelled) if status == "cancelled" else None,
        "request_counts": {"total": counts.total, "completed": counts.completed,
                           "failed": failed},
        "metadata": batch.metadata,
    }


def _line_error(where: str, message: str) -> RequestError:
    return RequestError(f"input file, {where}: {message}", code="invalid_batch_line")


def read_lines(content: bytes, batch_id: str, attribution: StoredFile, now: float,
               target: Callable[[str], Target | None]) -> list[Job]:
    """The jobs of a batch input file (``{"custom_id", "method", "url", "body"}`` per line),
    each model resolved to the provider that answers it in a batch. Raises RequestError
    naming the first line that is not valid."""
    jobs: list[Job] = []
    seen: set[str] = set()
    for n, raw in enumerate(content.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _line_error(f"line {n}", "not valid JSON") from None
        if not isinstance(line, dict):
            raise _line_error(f"line {n}", "not a JSON object")
        job_id = f"job_{batch_id[6:]}_{len(jobs):06d}"  # sorts in the input's order
        jobs.append(_line_job(line, (job_id, batch_id), f"line {n}", seen, attribution, now,
                              target))
        if len(jobs) > MAX_LINES:
            raise _line_error(f"line {n}", f"a batch holds at most {MAX_LINES} lines")
    if not jobs:
        raise RequestError("the input file holds no request", code="invalid_batch_line")
    return jobs


def _line_job(line: JSON, ids: tuple[str, str], where: str, seen: set[str], attribution: StoredFile,
              now: float, target: Callable[[str], Target | None]) -> Job:
    custom_id, body, url = line.get("custom_id"), line.get("body"), line.get("url")
    if not isinstance(custom_id, str) or not custom_id:
        raise _line_error(where, "'custom_id' must be a non-empty string")
    if custom_id in seen:
        raise _line_error(where, f"custom_id {custom_id[:64]!r} is used twice")
    seen.add(custom_id)
    if url not in (CHAT_ENDPOINT, None) or line.get("method", "POST") != "POST":
        raise _line_error(where, f"only POST {CHAT_ENDPOINT} is supported")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise _line_error(where, "'body' must be a chat request with a 'model'")
    if body.get("stream"):
        raise _line_error(where, "a batch line cannot stream")
    found = target(body["model"])
    if found is None:
        raise _line_error(where, f"model {body['model'][:64]!r} cannot be batched: its"
                          " provider has no batch API, or it is a route")
    job_id = ids[0]
    return Job(id=job_id, tenant=attribution.tenant, feature=attribution.feature,
               user=attribution.user, request_id=job_id, requested_model=found.name,
               provider=found.provider, provider_model=found.provider_model,
               body=orjson.dumps(body), created=now, due=now, group=ids[1],
               custom_id=custom_id)


def _result_line(job: Job) -> JSON:
    line: JSON = {"id": f"batch_req_{job.id[4:]}", "custom_id": job.custom_id}
    if job.state == "completed" and job.response is not None:
        line["response"] = {"status_code": 200, "request_id": job.request_id,
                            "body": orjson.loads(job.response)}
        line["error"] = None
    elif job.error in ("expired", "cancelled"):
        line["response"] = None
        line["error"] = {"code": f"batch_{job.error}", "message": job.message}
    else:
        error = {"message": job.message, "type": "server_error", "code": job.error or "failed"}
        line["response"] = {"status_code": 500, "request_id": job.request_id,
                            "body": {"error": error}}
        line["error"] = None
    return line


def result_lines(jobs: Sequence[Job], *, errors: bool) -> bytes:
    """The output file (the lines answered) or the error file (the others) of a batch's
    finished jobs, in the input's order."""
    chosen = [j for j in jobs if (j.state == "completed") != errors
              and j.state in ("completed", "failed", "cancelled")]
    return b"".join(orjson.dumps(_result_line(j)) + b"\n" for j in chosen)
