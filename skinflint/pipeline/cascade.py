"""Cheap-first cascades: call each tier in order, accept the first answer its quality gate
passes, escalate otherwise. The last tier's answer is accepted as it is.

A tier is one model or several called at once. Tiers are called through the rest of the
pipeline (token budget, provider call), so retries and fallbacks apply per call. Every call
whose answer is not the one returned is kept on the context as an :class:`Attempt`; the account
stage writes a ledger row for each, so its cost counts.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from skinflint.config import GateConfig, TierConfig
from skinflint.errors import UpstreamError
from skinflint.messages import last_user_text
from skinflint.models import StreamChunk, Usage
from skinflint.pipeline.context import (
    Attempt,
    GateVerdict,
    Next,
    Reply,
    RequestContext,
    RouteDecision,
    Target,
)
from skinflint.routing.gates import (
    answer_key,
    choices_in_prompt,
    content_of,
    mean_logprob,
    structural_check,
)
from skinflint.streaming import chunks_from_completion

__all__ = ["Cascade", "Scorer"]

JSON = dict[str, Any]


class Scorer(Protocol):
    """Estimates P(answer is correct); see :mod:`skinflint.routing.scorer`."""

    def score(self, prompt: str, answer: str, model: str, *, agreement: float | None) -> float: ...


@dataclass(slots=True)
class _Call:
    tier: int
    ctx: RequestContext  # the call's own copy of the request context
    reply: Reply | None
    error: UpstreamError | None
    key: str = ""  # the normalised answer; "" when invalid
    verdict: GateVerdict | None = None  # why it is not the answer: set once it is not


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
    def __init__(
        self,
        tiers: Sequence[TierConfig],
        resolve: Callable[[str], tuple[Target, ...]],
        scorer: Scorer | None,
    ) -> None:
        self.tiers = list(tiers)
        self._resolve = resolve
        self._scorer = scorer

    async def _call(
        self, ctx: RequestContext, next: Next, decision: RouteDecision, model: str
    ) -> _Call:
        own = copy.copy(ctx)
        own.attempts, own.errors, own.upstream_ms = [], [], 0.0
        own.stream = False  # a gate needs the whole answer
        own.route, own.targets = decision, self._resolve(model)
        tier = decision.tier
        try:
            return _Call(tier, own, await next(own), None)
        except UpstreamError as exc:
            return _Call(tier, own, None, exc)

    def _read(self, ctx: RequestContext, gate: GateConfig, call: _Call) -> None:
        """Structural check and normalised answer of one call."""
        if call.reply is None or call.reply.body is None:
            call.verdict = GateVerdict(call.error.error_type if call.error else "error")
            return
        choices = gate.choices
        if choices == "prompt":
            choices = choices_in_prompt(last_user_text(ctx.body.get("messages")))
        verdict = structural_check(
            call.reply.body, fmt=gate.format, choices=choices, schema=_schema(ctx.body)
        )
        if verdict.passed:
            key = answer_key(content_of(call.reply.body), fmt=gate.format, choices=choices)
            call.key = key or ("-" if gate.format is None else "")
            call.verdict = None if call.key else GateVerdict("format")
        else:
            call.verdict = GateVerdict(verdict.reason)

    def _decide(
        self, ctx: RequestContext, gate: GateConfig, own: _Call, calls: list[_Call]
    ) -> tuple[str, GateVerdict | None]:
        """(accepted answer, None) or ("", why not)."""
        if not own.key:
            return "", own.verdict or GateVerdict("invalid")
        if own.key in gate.accept_alone:
            return own.key, None
        votes = Counter(c.key for c in calls if c.key)
        candidate = own.key
        if gate.min_votes is not None:
            candidate = votes.most_common(1)[0][0]
            if votes[candidate] < gate.min_votes_for.get(candidate, gate.min_votes):
                return "", GateVerdict("votes")
        earlier = {c.tier: c.key for c in calls if c.tier != own.tier}
        if any(earlier.get(j) != candidate for j in gate.agree_with):
            return "", GateVerdict("disagree")
        if gate.accept and candidate not in gate.accept:
            return "", GateVerdict("not accepted")
        if gate.min_logprob is not None and own.reply is not None and own.reply.body:
            confidence = mean_logprob(own.reply.body)
            if confidence is not None and confidence < gate.min_logprob:
                return "", GateVerdict("logprob")
        if gate.scorer is not None and self._scorer is not None:
            p = self._score(ctx, own, votes, len([c for c in calls if c.reply is not None]))
            if p < gate.scorer:
                return "", GateVerdict("score", p)
        return candidate, None

    def _score(self, ctx: RequestContext, own: _Call, votes: Counter[str], answered: int) -> float:
        assert self._scorer is not None and own.reply is not None and own.reply.body is not None
        agreement = (votes[own.key] - 1) / (answered - 1) if answered > 1 else None
        return self._scorer.score(
            last_user_text(ctx.body.get("messages")),
            content_of(own.reply.body),
            own.ctx.model,
            agreement=agreement,
        )

    async def run(self, ctx: RequestContext, next: Next, route: RouteDecision) -> Reply:
        calls: list[_Call] = []
        last = len(self.tiers) - 1
        chosen: _Call | None = None
        skip_to_last = False
        for i, tier in enumerate(self.tiers):
            if skip_to_last and i != last:
                continue
            decision = replace(route, tier=i, tiers=last + 1)
            batch = await asyncio.gather(*(self._call(ctx, next, decision, m) for m in tier.names))
            for call in batch:
                self._read(ctx, tier.gate, call)
            calls.extend(batch)
            own = _own(batch, tier.answer_from)
            accepted, verdict = self._decide(ctx, tier.gate, own, calls)
            if accepted or i == last:
                chosen = _holder(batch, calls, accepted) if accepted else own
                ctx.route = decision
                break
            for call in batch:
                call.verdict = call.verdict or verdict
            skip_to_last = bool(tier.gate.continue_only_if) and (
                own.key not in tier.gate.continue_only_if
            )
        assert chosen is not None
        return self._finish(ctx, calls, chosen)

    def _finish(self, ctx: RequestContext, calls: list[_Call], chosen: _Call) -> Reply:
        for call in calls:
            ctx.upstream_ms += call.ctx.upstream_ms
            for retried in call.ctx.attempts:  # numbered anew: each call counted from 1
                number = sum(1 for a in ctx.attempts if a.retry) + 1
                ctx.attempts.append(dataclasses.replace(retried, retry=number))
            if call is not chosen and call.ctx.answered is not None:
                body = call.reply.body if call.reply and call.reply.body else {}
                status = call.error.status if call.error else 200
                ctx.attempts.append(
                    Attempt(
                        call.tier,
                        call.ctx.answered,
                        Usage.from_openai(body.get("usage")),
                        call.ctx.upstream_ms,
                        status,
                        call.error.error_type if call.error else "",
                        call.verdict or GateVerdict("not chosen"),
                    )
                )
        if chosen.error is not None or chosen.reply is None:
            raise chosen.error or UpstreamError("cascade: no tier answered")
        ctx.answered, ctx.targets = chosen.ctx.answered, chosen.ctx.targets
        ctx.token_cap = chosen.ctx.token_cap  # each tier's call was capped on its own copy
        if ctx.stream:
            assert chosen.reply.body is not None
            return Reply(chunks=_as_stream(chosen.reply.body))
        return chosen.reply


def _own(batch: list[_Call], answer_from: int) -> _Call:
    """The call that speaks for a tier: ``answer_from``, else its first valid answer."""
    first = batch[answer_from]
    if first.key:
        return first
    return next((c for c in batch if c.key), next((c for c in batch if c.reply), first))


def _holder(batch: list[_Call], calls: list[_Call], key: str) -> _Call:
    """A call that gave ``key``: from this tier first, else the latest earlier one."""
    for call in [*batch, *reversed(calls)]:
        if call.key == key:
            return call
    raise AssertionError("accepted answer has no call")
