"""What HTTP providers share: one boundary that turns aiohttp's exceptions into ours, and the
reading of vendor error responses."""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import aiohttp
import orjson

from skinflint.errors import (
    UpstreamConnectionError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from skinflint.interfaces import BatchAPI
from skinflint.models import BatchLine, BatchOutcome, BatchStatus

__all__ = [
    "DISCONNECTED",
    "BatchesVia",
    "client_timeout",
    "json_object",
    "model_objects",
    "new_session",
    "parse_off_loop",
    "retry_after_seconds",
    "status_error",
    "translate_errors",
    "vendor_message",
]

#: What a credential looks like in vendor error text: OpenAI-style ``sk-``/``pk-``/``rk-``
#: keys (masked fragments too), Google ``AIza`` keys, bearer tokens, ``key=value`` pairs.
_SECRET = re.compile(
    r"\b(?:sk|pk|rk)-[\w\-*.]{3,}"
    r"|\bAIza[\w\-]{10,}"
    r"|\b[Bb]earer\s+[\w\-.~+/=*]+"
    r"|\b(?:api[_-]?key|access[_-]?token|token|key)\s*[=:]\s*[^\s,;&\"']+",
    re.IGNORECASE,
)
_MAX_VENDOR_TEXT = 500

#: A body at least this large (a batch's result file) is parsed in a worker thread, so that
#: parsing it does not hold up every other request on the event loop.
OFF_LOOP_BYTES = 1 << 20

T = TypeVar("T")

#: The ``code`` of a connection error that happened after the request was sent: unlike a
#: refused connection, the provider may have done (and billed) the work.
DISCONNECTED = "upstream_disconnected"


@functools.lru_cache(maxsize=64)
def client_timeout(seconds: float, *, streaming: bool, connect: float) -> aiohttp.ClientTimeout:
    """A whole call must finish in ``seconds``; a stream may run longer as long as it never
    goes ``seconds`` without data. Memoised: one object per setting, not one per request."""
    if streaming:
        return aiohttp.ClientTimeout(total=None, connect=connect, sock_read=seconds)
    return aiohttp.ClientTimeout(total=seconds, connect=connect)


def new_session(*, limit: int = 1000) -> aiohttp.ClientSession:
    """The pooled client every HTTP provider shares (keep-alive, no per-host cap)."""
    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True
    )
    return aiohttp.ClientSession(
        connector=connector,
        json_serialize=lambda o: orjson.dumps(o).decode(),
        auto_decompress=True,
        trust_env=False,
    )


@contextmanager
def translate_errors(provider: str) -> Iterator[None]:
    """Foreign exceptions become :mod:`skinflint.errors` here and nowhere else."""
    try:
        yield
    except UpstreamError:
        raise
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise UpstreamTimeoutError(f"{provider}: upstream timed out", provider=provider) from None
    except aiohttp.ClientPayloadError:
        raise UpstreamProtocolError(
            f"{provider}: upstream cut the response short", provider=provider, code="upstream_cut"
        ) from None
    except aiohttp.ClientConnectorError as exc:  # never reached the provider
        raise UpstreamConnectionError(
            f"{provider}: cannot reach upstream ({type(exc).__name__})", provider=provider
        ) from None
    except aiohttp.ClientConnectionError as exc:  # the request may have gone out
        raise UpstreamConnectionError(
            f"{provider}: upstream closed the connection ({type(exc).__name__})",
            provider=provider,
            code=DISCONNECTED,
        ) from None
    except OSError as exc:
        raise UpstreamConnectionError(
            f"{provider}: cannot reach upstream ({type(exc).__name__})", provider=provider
        ) from None
    except aiohttp.ClientError as exc:
        raise UpstreamProtocolError(
            f"{provider}: {type(exc).__name__}", provider=provider
        ) from None


async def parse_off_loop(parse: Callable[[bytes], T], raw: bytes) -> T:
    """``parse(raw)``, in a worker thread when ``raw`` is large (see :data:`OFF_LOOP_BYTES`)."""
    if len(raw) < OFF_LOOP_BYTES:
        return parse(raw)
    return await asyncio.to_thread(parse, raw)


def json_object(raw: bytes, *, provider: str, what: str) -> dict[str, Any]:
    """``raw`` parsed as a JSON object, else an :class:`UpstreamProtocolError` naming ``what``."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise UpstreamProtocolError(
            f"{provider}: upstream sent an invalid {what}",
            provider=provider,
            code="upstream_bad_json",
        )
    return data


def model_objects(raw: bytes, *, provider: str) -> list[dict[str, Any]]:
    """The entries of a model list (``{"data": [{"id": ...}, ...]}``, OpenAI's shape and
    Anthropic's) that have a string ``id``; an answer without such a list is a protocol error."""
    data = json_object(raw, provider=provider, what="model list").get("data")
    if not isinstance(data, list):
        raise UpstreamProtocolError(
            f"{provider}: upstream sent a model list without data",
            provider=provider,
            code="upstream_bad_json",
        )
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None  # an HTTP date: rare from LLM APIs, and backoff applies anyway


def vendor_message(provider: str, status: int, text: str) -> str:
    """Vendor error text fit to show a tenant: a fixed sentence when the vendor refused the
    gateway's own credentials, else the text with anything key-like redacted, shortened."""
    if status in (401, 403):
        return f"the upstream rejected the gateway's credentials for provider {provider}"
    text = _SECRET.sub("[redacted]", text[: _MAX_VENDOR_TEXT * 2])
    return text if len(text) <= _MAX_VENDOR_TEXT else text[:_MAX_VENDOR_TEXT] + "..."


def status_error(
    provider: str, status: int, raw: bytes, retry_after: str | None
) -> UpstreamStatusError:
    """An error status from the vendor, with the vendor's message when it sent one."""
    message, etype, code = f"upstream returned HTTP {status}", None, None
    try:
        body: Any = orjson.loads(raw)
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            etype = err.get("type") if isinstance(err.get("type"), str) else None
            code = err.get("code") if isinstance(err.get("code"), str) else None
        elif isinstance(err, str):
            message = err
    except orjson.JSONDecodeError:
        pass
    return UpstreamStatusError(
        status,
        f"{provider}: {vendor_message(provider, status, message)}",
        provider=provider,
        error_type=etype,
        code=code,
        retry_after=retry_after_seconds(retry_after),
    )


class BatchesVia:
    """The batch API (:class:`skinflint.interfaces.BatchAPI`) of a provider that hands it to
    the object in ``_batches`` (its vendor's files and batches, or message batches)."""

    _batches: BatchAPI

    async def submit_batch(self, lines: Sequence[BatchLine], timeout: float) -> str:
        return await self._batches.submit_batch(lines, timeout)

    async def batch_status(self, batch_id: str, timeout: float) -> BatchStatus:
        return await self._batches.batch_status(batch_id, timeout)

    async def batch_results(self, batch_id: str, timeout: float) -> list[BatchOutcome]:
        return await self._batches.batch_results(batch_id, timeout)

    async def cancel_batch(self, batch_id: str, timeout: float) -> None:
        await self._batches.cancel_batch(batch_id, timeout)
