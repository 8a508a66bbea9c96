"""OpenAI's batch API (``/files`` and ``/batches``), spoken by any OpenAI-compatible provider
that has one: a :class:`skinflint.interfaces.BatchAPI` the provider delegates to.

A batch is a JSONL file of chat-completions requests, uploaded with ``purpose=batch``, then
``POST /batches`` over it. When it ends, its output file holds the lines that ran (with the
provider's HTTP status and body) and its error file those that failed or never ran
(``batch_expired``, ``batch_cancelled``). A line in neither file did not run: it counts as
expired, so that every line submitted gets an outcome.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import orjson

from skinflint.errors import UpstreamProtocolError
from skinflint.models import BatchLine, BatchOutcome, BatchStatus, Completion
from skinflint.providers.http import (
    client_timeout,
    json_object,
    parse_off_loop,
    status_error,
    translate_errors,
    vendor_message,
)

__all__ = ["ENDPOINT", "OpenAIBatches", "batch_jsonl", "outcome_of", "state_of"]

JSON = dict[str, Any]

#: The endpoint every line calls (OpenAI wants the path with its ``/v1``, whatever the base URL).
ENDPOINT = "/v1/chat/completions"

_RUNNING = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
_ENDED = frozenset({"completed", "expired", "cancelled"})
_UNRUN: dict[str, Literal["expired", "cancelled"]] = {"batch_expired": "expired",
                                                       "batch_cancelled": "cancelled"}


#: Fields of a chat request a batch line cannot honour (a batch answers whole completions).
_UNBATCHABLE = ("stream", "stream_options")


def batch_jsonl(lines: Sequence[BatchLine]) -> bytes:
    """The input file for ``lines``: one request object per line, ``stream`` left out."""
    return b"".join(
        orjson.dumps({"custom_id": line.custom_id, "method": "POST", "url": ENDPOINT,
                      "body": _batchable(line.body)}) + b"\n"
        for line in lines
    )


def _batchable(body: JSON) -> JSON:
    if not any(k in body for k in _UNBATCHABLE):
        return body
    return {k: v for k, v in body.items() if k not in _UNBATCHABLE}


def state_of(batch: JSON) -> BatchStatus:
    """A batch object as a :class:`BatchStatus`. A status this code does not know is taken as
    still running (``detail`` tells which), so a poller keeps asking rather than giving up."""
    detail = str(batch.get("status") or "")
    state: Literal["running", "ended", "failed"] = (
        "failed" if detail == "failed" else "ended" if detail in _ENDED else "running")
    counts = _dict(batch.get("request_counts"))
    return BatchStatus(
        id=str(batch.get("id") or ""),
        state=state,
        detail=detail,
        total=int(counts.get("total") or 0),
        succeeded=int(counts.get("completed") or 0),
        failed=int(counts.get("failed") or 0),
    )


def outcome_of(line: JSON, provider: str) -> BatchOutcome:
    """One line of an output or error file as an outcome."""
    custom_id = str(line.get("custom_id"))
    error = line.get("error")
    if isinstance(error, dict):
        text = str(error.get("message") or error.get("code") or "the line failed")
        return BatchOutcome(custom_id, error=_UNRUN.get(str(error.get("code")), "failed"),
                            message=vendor_message(provider, 0, text))
    response = _dict(line.get("response"))
    status = int(response.get("status_code") or 0)
    body = response.get("body")
    if status == 200 and isinstance(body, dict):
        return BatchOutcome(custom_id, completion=Completion(body=body))
    return BatchOutcome(custom_id, error="failed",
                        message=vendor_message(provider, status, _error_text(status, body)))


def _dict(value: object) -> JSON:
    return value if isinstance(value, dict) else {}


def _error_text(status: int, body: object) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    return err if isinstance(err, str) else f"the line was answered with HTTP {status}"


def _why(batch: JSON) -> str:
    """The first of a failed batch's errors (``{"data": [{"code", "message", "line"}]}``)."""
    data = _dict(batch.get("errors")).get("data")
    first = _dict(data[0]) if isinstance(data, list) and data else {}
    text = first.get("message") or first.get("code")
    return f" ({vendor_message('', 0, str(text))})" if text else ""


def _jsonl(raw: bytes, provider: str) -> Iterator[JSON]:
    """The objects of a JSONL file; an unreadable line is a protocol error (never skipped: a
    line skipped would be reported unrun, and perhaps paid for twice)."""
    for row in raw.splitlines():
        if row.strip():
            yield json_object(row, provider=provider, what="batch file line")


class OpenAIBatches:
    """The batch API at ``base`` (the provider's base URL, ``/v1`` included). ``headers`` are
    the provider's (authorization and configured headers); ``session`` is shared."""

    def __init__(self, name: str, *, base: str, session: aiohttp.ClientSession,
                 headers: dict[str, str], connect_timeout: float) -> None:
        self.name = name
        self._base = base.rstrip("/")
        self._session = session
        self._headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        self._connect = connect_timeout

    def __repr__(self) -> str:
        return f"OpenAIBatches({self.name!r}, url={self._base!r})"  # never the headers

    async def _call(self, method: str, path: str, timeout: float, *,
                    data: Any = None, json_body: JSON | None = None) -> bytes:
        """The body of a 2xx answer to ``method path``; anything else raises ours."""
        headers = self._headers
        if json_body is not None:
            data, headers = orjson.dumps(json_body), {**headers,
                                                      "content-type": "application/json"}
        with translate_errors(self.name):
            async with self._session.request(
                method, self._base + path, data=data, headers=headers,
                timeout=client_timeout(timeout, streaming=False, connect=self._connect),
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise status_error(self.name, resp.status, raw, resp.headers.get("retry-after"))
        return raw

    async def _object(self, method: str, path: str, timeout: float, **kw: Any) -> JSON:
        return json_object(await self._call(method, path, timeout, **kw), provider=self.name,
                           what="response")

    async def submit_batch(self, lines: Sequence[BatchLine], timeout: float) -> str:
        """Upload ``lines`` as a JSONL file, then create a batch over it; the batch id."""
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", batch_jsonl(lines), filename="batch.jsonl",
                       content_type="application/jsonl")
        upload = await self._object("POST", "/files", timeout, data=form)
        batch = await self._object("POST", "/batches", timeout, json_body={
            "input_file_id": self._id_of(upload, "file"), "endpoint": ENDPOINT,
            "completion_window": "24h"})
        return self._id_of(batch, "batch")

    async def batch_status(self, batch_id: str, timeout: float) -> BatchStatus:
        return state_of(await self._batch(batch_id, timeout))

    async def batch_results(self, batch_id: str, timeout: float) -> list[BatchOutcome]:
        """Every line's outcome, in the input file's order when a line is missing from both
        result files (the input is then read to name it), else in the files' order. Raises
        :class:`UpstreamProtocolError` (code ``batch_not_ended``) while the batch runs."""
        batch = await self._batch(batch_id, timeout)
        if state_of(batch).state == "running":  # its lines would all look unrun
            raise UpstreamProtocolError(
                f"{self.name}: batch {batch_id[:64]!r} has not ended", provider=self.name,
                code="batch_not_ended")
        found: dict[str, BatchOutcome] = {}
        for key in ("output_file_id", "error_file_id"):
            if batch.get(key):
                raw = await self._content(str(batch[key]), timeout)
                for outcome in await parse_off_loop(self._outcomes, raw):
                    found.setdefault(outcome.custom_id, outcome)
        total = int(_dict(batch.get("request_counts")).get("total") or 0)
        if (total and len(found) >= total) or not batch.get("input_file_id"):
            return list(found.values())
        return await self._with_unrun(found, batch, timeout)

    async def _with_unrun(self, found: dict[str, BatchOutcome], batch: JSON,
                          timeout: float) -> list[BatchOutcome]:
        """Every line of the input file: its outcome, or expired when it has none."""
        unrun = f"the line has no result: the batch is {batch.get('status')}{_why(batch)}"
        out = []
        raw = await self._content(str(batch["input_file_id"]), timeout)
        for custom_id in await parse_off_loop(self._custom_ids, raw):
            outcome = found.pop(custom_id, None)
            out.append(outcome or BatchOutcome(custom_id, error="expired", message=unrun))
        return out + list(found.values())

    def _outcomes(self, raw: bytes) -> list[BatchOutcome]:
        return [outcome_of(line, self.name) for line in _jsonl(raw, self.name)]

    def _custom_ids(self, raw: bytes) -> list[str]:
        return [str(line.get("custom_id")) for line in _jsonl(raw, self.name)]

    async def cancel_batch(self, batch_id: str, timeout: float) -> None:
        await self._object("POST", f"/batches/{quote(batch_id, safe='')}/cancel", timeout)

    async def _batch(self, batch_id: str, timeout: float) -> JSON:
        return await self._object("GET", f"/batches/{quote(batch_id, safe='')}", timeout)

    async def _content(self, file_id: str, timeout: float) -> bytes:
        return await self._call("GET", f"/files/{quote(file_id, safe='')}/content", timeout)

    def _id_of(self, obj: JSON, what: str) -> str:
        if not isinstance(obj.get("id"), str) or not obj["id"]:
            raise UpstreamProtocolError(f"{self.name}: upstream sent a {what} without an id",
                                        provider=self.name, code="upstream_bad_json")
        return str(obj["id"])
