"""Anthropic's Message Batches API behind :class:`skinflint.interfaces.BatchAPI`: lines go in
as OpenAI chat-completions bodies (translated with :func:`to_anthropic`), results come out as
OpenAI ``chat.completion`` objects (translated with :func:`from_anthropic`).

Anthropic lists every request of an ended batch in its results: ``succeeded``, ``errored``
(not billed), ``expired`` or ``canceled``. A ``custom_id`` must match ``[a-zA-Z0-9_-]{1,64}``:
another is refused before anything is sent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import aiohttp
import orjson

from skinflint.errors import UpstreamProtocolError, UpstreamStatusError
from skinflint.models import BatchLine, BatchOutcome, BatchStatus, Completion
from skinflint.providers.anthropic_format import (
    PREFIX,
    from_anthropic,
    status_error,
    to_anthropic,
)
from skinflint.providers.http import (
    client_timeout,
    json_object,
    parse_off_loop,
    translate_errors,
    vendor_message,
)

__all__ = ["AnthropicBatches", "outcome_of", "request_of", "state_of"]

JSON = dict[str, Any]

_CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_STATES: dict[str, Literal["running", "ended"]] = {"in_progress": "running",
                                                   "canceling": "running", "ended": "ended"}
_UNRUN: dict[str, Literal["expired", "cancelled"]] = {"expired": "expired",
                                                      "canceled": "cancelled"}


def request_of(line: BatchLine, default_max_tokens: int) -> JSON:
    """The batch request for ``line``: its body translated for the model it names. Raises
    :class:`UpstreamStatusError` (400, naming the line) when the body cannot be translated or
    the ``custom_id`` is not one Anthropic accepts."""
    if not _CUSTOM_ID.fullmatch(line.custom_id):
        raise UpstreamStatusError(400, PREFIX + "a batch custom_id must be 1 to 64 letters, "
                                  "digits, '_' or '-'", error_type="invalid_request_error",
                                  code="invalid_custom_id")
    try:
        params = to_anthropic(line.body, str(line.body.get("model") or ""), default_max_tokens)
    except UpstreamStatusError as exc:
        raise UpstreamStatusError(exc.status, f"{exc.message} (batch line {line.custom_id[:64]!r})",
                                  error_type=exc.error_type, code=exc.code) from None
    params.pop("stream", None)
    return {"custom_id": line.custom_id, "params": params}


def state_of(batch: JSON) -> BatchStatus:
    """A message batch as a :class:`BatchStatus`; an unknown ``processing_status`` is taken as
    still running, so a poller keeps asking."""
    detail = str(batch.get("processing_status") or "")
    counts = {k: int(v) for k, v in (batch.get("request_counts") or {}).items()
              if isinstance(v, int)}
    return BatchStatus(id=str(batch.get("id") or ""), state=_STATES.get(detail, "running"),
                       detail=detail, total=sum(counts.values()),
                       succeeded=counts.get("succeeded", 0), failed=counts.get("errored", 0))


def outcome_of(line: JSON, provider: str) -> BatchOutcome:
    """One line of the results file as an outcome, a success translated to OpenAI's format
    (under the model name Anthropic answered with)."""
    custom_id = str(line.get("custom_id"))
    result = _dict(line.get("result"))
    kind = str(result.get("type"))
    message = result.get("message")
    if kind == "succeeded" and isinstance(message, dict):
        return BatchOutcome(custom_id, completion=Completion(
            body=from_anthropic(message, str(message.get("model") or ""))))
    if kind in _UNRUN:
        return BatchOutcome(custom_id, error=_UNRUN[kind], message=f"the request {kind}")
    return BatchOutcome(custom_id, error="failed",
                        message=PREFIX + vendor_message(provider, 0, _error_text(result)))


def _dict(value: object) -> JSON:
    return value if isinstance(value, dict) else {}


def _error_text(result: JSON) -> str:
    """The message of an ``errored`` result, whose ``error`` is an error response
    (``{"type": "error", "error": {"type", "message"}}``) or, in older answers, the inner one."""
    error = _dict(result.get("error"))
    inner = _dict(error.get("error")) or error
    return str(inner.get("message") or inner.get("type") or f"the request {result.get('type')}")


class AnthropicBatches:
    """The Message Batches API under ``root`` (the API's root URL, ``/v1`` excluded)."""

    def __init__(self, name: str, *, root: str, session: aiohttp.ClientSession,
                 headers: dict[str, str], default_max_tokens: int) -> None:
        self.name = name
        self._url = root.rstrip("/") + "/v1/messages/batches"
        self._session = session
        self._headers = headers
        self._default_max_tokens = default_max_tokens

    def __repr__(self) -> str:
        return f"AnthropicBatches({self.name!r}, url={self._url!r})"  # never the key

    async def _call(self, method: str, url: str, timeout: float,
                    body: JSON | None = None) -> bytes:
        """The body of a 2xx answer; anything else raises ours."""
        with translate_errors(self.name):
            async with self._session.request(
                method, url, headers=self._headers,
                data=None if body is None else orjson.dumps(body),
                timeout=client_timeout(timeout, streaming=False, connect=timeout),
            ) as resp:
                raw = await resp.read()
                if not 200 <= resp.status < 300:
                    raise status_error(resp.status, raw, resp.headers.get("retry-after"),
                                       self.name)
        return raw

    async def _batch(self, method: str, url: str, timeout: float,
                     body: JSON | None = None) -> JSON:
        return json_object(await self._call(method, url, timeout, body), provider=self.name,
                           what="message batch")

    def _url_of(self, batch_id: str, tail: str = "") -> str:
        return f"{self._url}/{quote(batch_id, safe='')}{tail}"

    async def submit_batch(self, lines: Sequence[BatchLine], timeout: float) -> str:
        """Translate every line (before anything is sent), then create the batch."""
        requests = [request_of(line, self._default_max_tokens) for line in lines]
        batch = await self._batch("POST", self._url, timeout, {"requests": requests})
        if not isinstance(batch.get("id"), str) or not batch["id"]:
            raise UpstreamProtocolError(PREFIX + "upstream sent a batch without an id",
                                        provider=self.name, code="upstream_bad_json")
        return str(batch["id"])

    async def batch_status(self, batch_id: str, timeout: float) -> BatchStatus:
        return state_of(await self._batch("GET", self._url_of(batch_id), timeout))

    async def batch_results(self, batch_id: str, timeout: float) -> list[BatchOutcome]:
        """Every request's outcome, read from the batch's ``results_url`` (the key is sent
        only to the API's own origin: another origin gets the documented path instead)."""
        batch = await self._batch("GET", self._url_of(batch_id), timeout)
        url = batch.get("results_url")
        if not isinstance(url, str) or not url:
            raise UpstreamProtocolError(PREFIX + f"batch {batch_id[:64]!r} has no results yet",
                                        provider=self.name, code="batch_not_ended")
        if _origin(url) != _origin(self._url):
            url = self._url_of(batch_id, "/results")
        return await parse_off_loop(self._outcomes, await self._call("GET", url, timeout))

    def _outcomes(self, raw: bytes) -> list[BatchOutcome]:
        return [outcome_of(json_object(row, provider=self.name, what="batch result"), self.name)
                for row in raw.splitlines() if row.strip()]

    async def cancel_batch(self, batch_id: str, timeout: float) -> None:
        await self._batch("POST", self._url_of(batch_id, "/cancel"), timeout)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc
