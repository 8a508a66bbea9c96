"""The fake upstream's batch APIs: OpenAI's files and batches, and Anthropic's message batches.

Mounted on :class:`tests.fake_upstream.FakeUpstream` (``fake.batches``), served on the same
port. Each line of a batch is answered exactly as the live endpoint would answer it (the echo,
``answer_as`` scripts, answerers, usage markers), so a batch result can be compared with a
real-time call of the same request.

A batch moves one step each time its status is read (``GET /v1/batches/{id}`` or
``GET /v1/messages/batches/{id}``): OpenAI ``validating -> in_progress -> finalizing ->
completed``, Anthropic ``in_progress -> ended``, so a poller sees every state and tests need no
clock. Tests steer it:

* ``hold()``: batches stay ``in_progress`` until ``release()`` (a gateway restart in the middle
  of a job);
* ``expire_next(n)``: the next ``n`` batches to finish expire instead, their lines unanswered
  (OpenAI: ``expired`` with every line in the error file as ``batch_expired``; Anthropic:
  ``ended`` with every result ``expired``);
* a line whose last user message holds ``[[batch:fail]]`` fails alone (OpenAI: an error-file
  line with a 500 response; Anthropic: an ``errored`` result);
* ``cancel``: ``cancelling`` then ``cancelled`` (OpenAI), ``canceling`` then ``ended`` with the
  unanswered lines ``canceled`` (Anthropic);
* ``refuse_next(n)``: the next ``n`` OpenAI batches fail validation at their first status read
  (status ``failed``, ``errors`` naming line 1, no result file);
* ``omit_unrun_next(n)``: the next ``n`` batches that end with lines unanswered list those lines
  in no result file (OpenAI has done so for cancelled batches), Anthropic results included.

``submitted`` counts the lines sent through batches; ``batch(id)`` shows one batch's state.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["FAIL_MARKER", "FakeBatches"]

JSON = dict[str, Any]
Answer = Callable[[JSON, str], JSON]  # (request body, api: "openai" | "anthropic") -> answer

FAIL_MARKER = "[[batch:fail]]"
_OPENAI_STEPS = ("validating", "in_progress", "finalizing", "completed")


@dataclass
class _File:
    id: str
    purpose: str
    filename: str
    content: bytes
    created_at: int

    def view(self) -> JSON:
        return {"id": self.id, "object": "file", "bytes": len(self.content),
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed"}


@dataclass
class _Batch:
    id: str
    api: str  # "openai" | "anthropic"
    lines: list[tuple[str, JSON]]  # (custom_id, body)
    created_at: int
    meta: JSON = field(default_factory=dict)  # OpenAI: endpoint, input_file_id, metadata
    step: int = 0
    outcome: str | None = None  # None until it ends: completed | expired | cancelled
    cancelling: bool = False
    results: list[JSON] = field(default_factory=list)
    errors: list[JSON] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None


def _fails(body: JSON) -> bool:
    messages = body.get("messages") or []
    return bool(messages) and FAIL_MARKER in json.dumps(messages[-1])


class FakeBatches:
    """See the module docstring. ``answer(body, api)`` gives a line's answer."""

    def __init__(self, answer: Answer, root_url: Callable[[], str]) -> None:
        self._answer = answer
        self._root_url = root_url
        self._lock = threading.Lock()
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}
        self._ids = itertools.count(1)
        self._held = False
        self._expire = 0
        self._omit = 0
        self._refuse = 0
        self.submitted = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{id}", self._file)
        app.router.add_get("/v1/files/{id}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches/{id}", self._status)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel)
        app.router.add_post("/v1/messages/batches", self._create_anthropic)
        app.router.add_get("/v1/messages/batches/{id}", self._status_anthropic)
        app.router.add_get("/v1/messages/batches/{id}/results", self._results_anthropic)
        app.router.add_post("/v1/messages/batches/{id}/cancel", self._cancel_anthropic)

    # --- steering -------------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self._files.clear()
            self._batches.clear()
            self._held, self._expire, self._omit, self.submitted = False, 0, 0, 0
            self._refuse = 0

    def hold(self) -> None:
        """Keep every batch in progress until :meth:`release`."""
        with self._lock:
            self._held = True

    def release(self) -> None:
        with self._lock:
            self._held = False

    def expire_next(self, n: int = 1) -> None:
        with self._lock:
            self._expire += n

    def refuse_next(self, n: int = 1) -> None:
        with self._lock:
            self._refuse += n

    def omit_unrun_next(self, n: int = 1) -> None:
        with self._lock:
            self._omit += n

    def batch(self, batch_id: str) -> JSON:
        """A batch's state for assertions: api, lines, step, outcome."""
        with self._lock:
            b = self._batches[batch_id]
            return {"api": b.api, "lines": len(b.lines), "step": b.step, "outcome": b.outcome,
                    "custom_ids": [cid for cid, _ in b.lines]}

    def batch_ids(self) -> list[str]:
        with self._lock:
            return list(self._batches)

    # --- the state machine ----------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    def _advance(self, b: _Batch) -> None:
        """One step on each status read; a batch ends at its last step (unless held)."""
        if b.outcome is not None:
            return
        if b.api == "openai" and self._refuse:
            self._refuse -= 1
            b.outcome = "failed"  # validation failed: no line ran, no result file
            return
        if b.cancelling:
            self._finish(b, "cancelled")
            return
        last = len(_OPENAI_STEPS) - 1 if b.api == "openai" else 1
        if b.step + 1 >= last and self._held:
            b.step = max(b.step, last - 1)
            return
        b.step = min(b.step + 1, last)
        if b.step == last:
            outcome = "completed"
            if self._expire:
                self._expire -= 1
                outcome = "expired"
            self._finish(b, outcome)

    def _finish(self, b: _Batch, outcome: str) -> None:
        b.outcome = outcome
        omit = outcome != "completed" and self._omit > 0
        self._omit -= omit
        for index, (custom_id, body) in enumerate(b.lines):
            if omit:
                continue
            if outcome != "completed":
                b.errors.append(self._unanswered(b, index, custom_id, outcome))
            elif _fails(body):
                b.errors.append(self._failed(b, index, custom_id))
            else:
                b.results.append(self._succeeded(b, index, custom_id, body))
        if b.api == "openai":
            b.output_file_id = self._store_lines(b.results) if b.results else None
            b.error_file_id = self._store_lines(b.errors) if b.errors else None

    def _store_lines(self, lines: list[JSON]) -> str:
        content = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        f = _File(self._new_id("file-"), "batch_output", "results.jsonl", content,
                  int(time.time()))
        self._files[f.id] = f
        return f.id

    def _succeeded(self, b: _Batch, index: int, custom_id: str, body: JSON) -> JSON:
        answer = self._answer(body, b.api)
        if b.api == "anthropic":
            return {"custom_id": custom_id, "result": {"type": "succeeded", "message": answer}}
        return {"id": f"batch_req_{b.id}_{index}", "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": f"req_{index}", "body": answer},
                "error": None}

    @staticmethod
    def _failed(b: _Batch, index: int, custom_id: str) -> JSON:
        message = "the server had an error while processing this line"
        if b.api == "anthropic":
            return {"custom_id": custom_id, "result": {"type": "errored", "error": {
                "type": "error", "error": {"type": "api_error", "message": message}}}}
        error = {"message": message, "type": "server_error", "code": "server_error"}
        return {"id": f"batch_req_{b.id}_{index}", "custom_id": custom_id,
                "response": {"status_code": 500, "request_id": f"req_{index}",
                             "body": {"error": error}}, "error": None}

    @staticmethod
    def _unanswered(b: _Batch, index: int, custom_id: str, outcome: str) -> JSON:
        if b.api == "anthropic":
            kind = "expired" if outcome == "expired" else "canceled"
            return {"custom_id": custom_id, "result": {"type": kind}}
        code = "batch_expired" if outcome == "expired" else "batch_cancelled"
        return {"id": f"batch_req_{b.id}_{index}", "custom_id": custom_id, "response": None,
                "error": {"code": code, "message": f"this line was not run: the batch {outcome}"}}

    # --- OpenAI ---------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        form = _multipart(request.headers.get("content-type", ""), await request.read())
        if "file" not in form or "purpose" not in form:
            return _openai_error(400, "a multipart form with 'file' and 'purpose' is required")
        (filename, content), (_, purpose) = form["file"], form["purpose"]
        with self._lock:
            f = _File(self._new_id("file-"), purpose.decode(), filename, content,
                      int(time.time()))
            self._files[f.id] = f
        return web.json_response(f.view())

    async def _file(self, request: web.Request) -> web.Response:
        with self._lock:
            f = self._files.get(request.match_info["id"])
        return _openai_error(404, "no such file") if f is None else web.json_response(f.view())

    async def _content(self, request: web.Request) -> web.Response:
        with self._lock:
            f = self._files.get(request.match_info["id"])
        if f is None:
            return _openai_error(404, "no such file")
        return web.Response(body=f.content, content_type="application/octet-stream")

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            f = self._files.get(str(body.get("input_file_id")))
            if f is None:
                return _openai_error(404, "input_file_id: no such file")
            lines = []
            for raw in f.content.splitlines():
                if raw.strip():
                    line = json.loads(raw)
                    lines.append((str(line["custom_id"]), dict(line["body"])))
            meta = {k: body.get(k) for k in ("endpoint", "completion_window", "metadata")}
            b = _Batch(self._new_id("batch_"), "openai", lines, int(time.time()),
                       {**meta, "input_file_id": f.id})
            self._batches[b.id] = b
            self.submitted += len(lines)
            return web.json_response(_openai_view(b))

    async def _status(self, request: web.Request) -> web.Response:
        with self._lock:
            b = self._batches.get(request.match_info["id"])
            if b is None or b.api != "openai":
                return _openai_error(404, "no such batch")
            self._advance(b)
            return web.json_response(_openai_view(b))

    async def _cancel(self, request: web.Request) -> web.Response:
        with self._lock:
            b = self._batches.get(request.match_info["id"])
            if b is None or b.api != "openai":
                return _openai_error(404, "no such batch")
            if b.outcome is None:
                b.cancelling = True
            return web.json_response(_openai_view(b))

    # --- Anthropic ------------------------------------------------------------------------

    async def _create_anthropic(self, request: web.Request) -> web.Response:
        body = await request.json()
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            return _anthropic_error(400, "requests: a non-empty list is required")
        lines = [(str(r["custom_id"]), dict(r["params"])) for r in requests]
        with self._lock:
            b = _Batch(self._new_id("msgbatch_"), "anthropic", lines, int(time.time()))
            self._batches[b.id] = b
            self.submitted += len(lines)
            return web.json_response(self._anthropic_view(b))

    async def _status_anthropic(self, request: web.Request) -> web.Response:
        with self._lock:
            b = self._batches.get(request.match_info["id"])
            if b is None or b.api != "anthropic":
                return _anthropic_error(404, "no such batch")
            self._advance(b)
            return web.json_response(self._anthropic_view(b))

    async def _results_anthropic(self, request: web.Request) -> web.Response:
        with self._lock:
            b = self._batches.get(request.match_info["id"])
            if b is None or b.api != "anthropic" or b.outcome is None:
                return _anthropic_error(404, "no results for this batch")
            lines = [*b.results, *b.errors]
        content = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        return web.Response(body=content, content_type="application/binary")

    async def _cancel_anthropic(self, request: web.Request) -> web.Response:
        with self._lock:
            b = self._batches.get(request.match_info["id"])
            if b is None or b.api != "anthropic":
                return _anthropic_error(404, "no such batch")
            if b.outcome is None:
                b.cancelling = True
            return web.json_response(self._anthropic_view(b))

    def _anthropic_view(self, b: _Batch) -> JSON:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if b.outcome is None:
            counts["processing"] = len(b.lines)
        else:
            for line in [*b.results, *b.errors]:
                counts[line["result"]["type"]] += 1
        status = "ended" if b.outcome else ("canceling" if b.cancelling else "in_progress")
        ended = b.outcome is not None
        return {"id": b.id, "type": "message_batch", "processing_status": status,
                "request_counts": counts, "created_at": _iso(b.created_at),
                "expires_at": _iso(b.created_at + 86400),
                "ended_at": _iso(int(time.time())) if ended else None,
                "cancel_initiated_at": _iso(b.created_at) if b.cancelling else None,
                "archived_at": None,
                "results_url": (f"{self._root_url()}/v1/messages/batches/{b.id}/results"
                                if ended else None)}


def _openai_view(b: _Batch) -> JSON:
    if b.outcome is not None:
        status = b.outcome
    elif b.cancelling:
        status = "cancelling"
    else:
        status = _OPENAI_STEPS[b.step]
    done = len(b.results)
    errors = None if status != "failed" else {"object": "list", "data": [
        {"code": "invalid_request", "message": "line 1: the model is not available for batches",
         "param": "body.model", "line": 1}]}
    return {"id": b.id, "object": "batch", "endpoint": b.meta.get("endpoint"), "errors": errors,
            "input_file_id": b.meta.get("input_file_id"),
            "completion_window": b.meta.get("completion_window") or "24h", "status": status,
            "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
            "created_at": b.created_at, "expires_at": b.created_at + 86400,
            "completed_at": int(time.time()) if status == "completed" else None,
            "expired_at": int(time.time()) if status == "expired" else None,
            "cancelled_at": int(time.time()) if status == "cancelled" else None,
            "request_counts": {"total": len(b.lines), "completed": done,
                               "failed": len(b.errors)},
            "metadata": b.meta.get("metadata")}


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str, bytes]]:
    """A multipart form's fields: name -> (filename, bytes). The request body was read already
    (the fake records it), so it is parsed here rather than by aiohttp."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    fields: dict[str, tuple[str, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name] = (part.get_filename() or "", payload)
    return fields


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _openai_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                        "code": None}}, status=status)


def _anthropic_error(status: int, message: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": "not_found_error"
                                                         if status == 404 else
                                                         "invalid_request_error",
                                                         "message": message}}, status=status)
