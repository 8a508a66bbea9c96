"""Cheap-first cascades: call each tier in order, accept the first answer its quality gate
passes, escalate otherwise. The last tier's answer is accepted as it is.

Tiers are called through the rest of the pipeline (token budget, provider call), so retries
and fallbacks apply per tier. Every tier that did not answer is kept on the context as an
:class:`Attempt`; the account stage writes a ledger row for each, so its cost counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from skinflint.config import GateConfig, TierConfig
from skinflint.errors import UpstreamError
from skinflint.models import StreamChunk, Usage
from skinflint.pipeline.context import Attempt, Next, Reply, RequestContext, Target
from skinflint.routing.gates import Verdict, answer_key, content_of, structural_check
from skinflint.routing.text import last_user_text
from skinflint.streaming import chunks_from_completion

__all__ = ["Cascade", "Scorer"]

JSON = dict[str, Any]


class Scorer(Protocol):
    """Estimates P(answer is correct); see :mod:`skinflint.routing.scorer`."""

    def score(self, prompt: str, answer: str, model: str, *, agreement: float | None) -> float: ...


async def _as_stream(body: JSON) -> AsyncIterator[StreamChunk]:
    for data in chunks_from_completion(body, include_usage=True):
        yield StreamChunk(data=data)


def _schema(body: JSON) -> JSON | None:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            return spec["schema"]  # type: ignore[no-any-return]
    return None


class Cascade:
    def __init__(self, tiers: Sequence[TierConfig], resolve: Callable[[str], tuple[Target, ...]],
                 scorer: Scorer | None) -> None:
        self.tiers = list(tiers)
        self._resolve = resolve
        self._scorer = scorer

    def _gate(self, ctx: RequestContext, gate: GateConfig, body: JSON,
              keys: dict[int, str]) -> tuple[Verdict, str]:
        verdict = structural_check(body, fmt=gate.format, choices=gate.choices,
                                   schema=_schema(ctx.body))
        key = answer_key(content_of(body), fmt=gate.format, choices=gate.choices)
        if not verdict.passed:
            return verdict, key
        agree = [keys.get(j) == key for j in gate.agree_with if j in keys]
        if gate.agree_with and (len(agree) < len(gate.agree_with) or not all(agree)):
            return Verdict(False, "disagree"), key
        if gate.scorer is not None and self._scorer is not None:
            agreement = None
            if keys:
                agreement = sum(k == key for k in keys.values()) / len(keys)
            p = self._scorer.score(last_user_text(ctx.body.get("messages")), content_of(body),
                                   ctx.model, agreement=agreement)
            if p < gate.scorer:
                return Verdict(False, f"score {p:.2f}"), key
        return Verdict(True), key

    async def run(self, ctx: RequestContext, next: Next, label: str) -> Reply:
        streaming, ctx.stream = ctx.stream, False  # a gate needs the whole answer
        keys: dict[int, str] = {}
        last = len(self.tiers) - 1
        for i, tier in enumerate(self.tiers):
            ctx.targets = self._resolve(tier.model)
            ctx.route = f"{label};tier={i + 1}/{last + 1}"
            started_ms = ctx.upstream_ms
            try:
                reply = await next(ctx)
            except UpstreamError as exc:
                if i == last:
                    raise
                self._escalate(ctx, i, started_ms, None, exc.status, exc.error_type)
                continue
            assert reply.body is not None
            verdict, keys[i] = self._gate(ctx, tier.gate, reply.body, keys)
            if verdict.passed or i == last:
                break
            usage = Usage.from_openai(reply.body.get("usage"))
            self._escalate(ctx, i, started_ms, usage, 200, "", verdict.reason)
        ctx.stream = streaming
        if streaming:
            assert reply.body is not None
            return Reply(chunks=_as_stream(reply.body))
        return reply

    @staticmethod
    def _escalate(ctx: RequestContext, tier: int, started_ms: float, usage: Usage | None,
                  status: int, error_type: str, reason: str = "") -> None:
        assert ctx.answered is not None
        ctx.attempts.append(Attempt(tier, ctx.answered, usage, ctx.upstream_ms - started_ms,
                                    status, error_type, reason))
        ctx.answered = None
