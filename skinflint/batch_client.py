"""``skinflint.batch_map``: in-prompt batching as a library call, against the skinflint gateway
or any OpenAI-compatible endpoint (it sends ``{base_url}/chat/completions`` with the openai
SDK). Through the gateway, each packed call is ledgered and its cost read from the
``x-skinflint-cost-usd`` header; elsewhere the cost is priced from the price catalog.

    from skinflint import batch_map
    result = batch_map(["great!", "it broke"], "Classify the sentiment: positive or negative.",
                       model="gpt-4o-mini", base_url="http://127.0.0.1:8787/v1")
    [r.output for r in result.results]  # ["positive", "negative"]
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import openai

from skinflint.batchmap import (
    CONCURRENCY,
    BatchResult,
    CallAnswer,
    CallFailed,
    PackedCall,
    run_batch_map,
)
from skinflint.models import Usage
from skinflint.packing import PackSpec, parse_items
from skinflint.pricing import PriceCatalog
from skinflint.tokens import TokenCounter

__all__ = ["DEFAULT_BASE_URL", "abatch_map", "batch_map"]

#: The gateway's default address (``skinflint serve``).
DEFAULT_BASE_URL = "http://127.0.0.1:8787/v1"
_COST_HEADER = "x-skinflint-cost-usd"



@functools.cache
def _services() -> tuple[TokenCounter, PriceCatalog]:
    """The token counter and price catalog, made once: their data loads once per process."""
    return TokenCounter(), PriceCatalog()


def _client(base_url: str, api_key: str | None, timeout: float,
            max_retries: int) -> openai.AsyncOpenAI:
    """The SDK's client; without a key (given, or in the SDK's ``OPENAI_API_KEY``), one
    that sends a placeholder, which a gateway configured without keys accepts."""
    try:
        return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout,
                                  max_retries=max_retries)
    except openai.OpenAIError:
        return openai.AsyncOpenAI(base_url=base_url, api_key="none", timeout=timeout,
                                  max_retries=max_retries)


def _retryable(exc: openai.APIError) -> bool:
    status = getattr(exc, "status_code", None)
    return status is None or status >= 500 or status in (408, 409, 429)


class _Sender:
    def __init__(self, client: openai.AsyncOpenAI, headers: Mapping[str, str]) -> None:
        self._client = client
        self._headers = dict(headers)
        # through the gateway, a retry must ask anew, not be served the answer it retries
        bypass = self._headers.get("x-skinflint-cache", "").strip().lower() == "bypass"
        self._retry_headers = self._headers if bypass else {
            **self._headers, "x-skinflint-cache": "refresh"}

    async def __call__(self, call: PackedCall) -> CallAnswer:
        headers = self._retry_headers if call.attempt else self._headers
        try:
            raw = await self._client.chat.completions.with_raw_response.create(
                **call.body, extra_headers=headers)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError):
            raise  # every call would fail the same way: stop
        except openai.APIError as exc:
            raise CallFailed(f"upstream call failed: {exc.message}",
                             retryable=_retryable(exc)) from None
        completion: dict[str, Any] = raw.parse().model_dump(mode="json", exclude_unset=True)
        return CallAnswer(completion, await _cost(raw.headers.get(_COST_HEADER), completion))


async def _cost(header: str | None, completion: dict[str, Any]) -> float | None:
    if header is not None:
        try:
            return float(header)
        except ValueError:
            return None  # "unknown": the gateway has no price for it either
    usage = Usage.from_openai(completion.get("usage"))
    model = completion.get("model")
    if usage is None or not isinstance(model, str):
        return None
    _, catalog = _services()
    return await asyncio.to_thread(catalog.cost, model, usage)  # loads the catalog once


async def abatch_map(
    items: Sequence[Any],
    instruction: str,
    *,
    model: str,
    base_url: str = DEFAULT_BASE_URL,
    max_items_per_call: int | None = None,
    response_schema: dict[str, Any] | None = None,
    api_key: str | None = None,
    feature: str | None = None,
    headers: Mapping[str, str] | None = None,
    concurrency: int = CONCURRENCY,
    timeout: float = 120.0,
    max_retries: int = 2,
) -> BatchResult:
    """Apply ``instruction`` to each item with as few calls as the token budget allows; see
    :func:`batch_map`."""
    parsed = parse_items(list(items))
    spec = PackSpec(model, instruction, response_schema, max_items_per_call)
    sent = dict(headers or {})
    if feature:
        sent["x-skinflint-feature"] = feature
    tokens, _ = _services()
    async with _client(base_url, api_key, timeout, max_retries) as client:
        return await run_batch_map(parsed, spec, _Sender(client, sent), tokens=tokens,
                                   concurrency=concurrency)


def batch_map(
    items: Sequence[Any],
    instruction: str,
    *,
    model: str,
    base_url: str = DEFAULT_BASE_URL,
    max_items_per_call: int | None = None,
    **options: Any,
) -> BatchResult:
    """Apply ``instruction`` to each item (a string, or ``{"id", "input"}``), packing many
    items into each chat call; the result holds one ``{"id", "output", "status"}`` per item,
    in input order, the calls made, their usage and cost. Items answered badly are retried in
    a smaller batch, then alone; one still failing has status ``error``. ``options``:
    ``response_schema``, ``api_key`` (else the openai SDK's ``OPENAI_API_KEY``),
    ``feature`` (sent as ``x-skinflint-feature``), ``headers``, ``concurrency``,
    ``timeout``, ``max_retries``. Inside a running event loop, await :func:`abatch_map`."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(abatch_map(items, instruction, model=model, base_url=base_url,
                                      max_items_per_call=max_items_per_call, **options))
    raise RuntimeError("batch_map() was called inside an event loop: await abatch_map()")
