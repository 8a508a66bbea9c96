"""Duplicates in a log, found as the caches would find them.

Exact: a request whose exact-cache key (the request hash, default normalisation, within the
cache's scope, and within its feature when the feature has a cache policy of its own) was seen
before, and whose entry would still be there: stored by the first request of that key, it lives
for the cache's TTL for that feature and model, and the first request after it expired stores it
again. Requests of a feature or model the cache is off for are never duplicates. Near: a request
that is not an exact duplicate whose last user message matches an earlier question of the same
semantic partition (scope, model, system prompt, parameters and earlier turns:
:func:`skinflint.pipeline.cache.context_digest`), asked within that question's TTL, at the
semantic cache's threshold, with its embedder, and passes its verifier when that is on. As in
the cache, a question that was itself served from the semantic cache is not indexed, so it
matches nothing. The temperature rules are not applied to these counts (they are what the
cache serves once the rules allow it); :func:`kept_out_by_temperature` says which of them the
rules as configured keep out.

The embedder costs milliseconds a text, so it only sees texts that could match. A question is
compared with the earlier questions of its partition whose bag of words has a cosine of at least
:data:`PREFILTER_COSINE` with it (its :data:`PREFILTER_TOP_K` closest); the verifier, when on,
is asked first (it costs a fraction of an embedding and the cache asks it of the same pairs);
only the texts of the pairs left are embedded. Of the 667 labelled Quora question pairs
(``qqp_pairs_dev.jsonl``, both halves) that the shipped embedder and verifier accept at the
shipped threshold, the prefilter keeps 663 (99.4%; all 667 at 0.65): near duplicates may be
undercounted by about that much.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from skinflint.analytics.audit_input import Call
from skinflint.config import CacheConfig
from skinflint.embed import Embedder
from skinflint.messages import last_user_text
from skinflint.pipeline.cache import (
    context_digest,
    merged_policy,
    split_question,
    temperature_bypass,
)
from skinflint.semantic.verifier import compare

__all__ = [
    "PREFILTER_COSINE",
    "PREFILTER_NOTE",
    "PREFILTER_TOP_K",
    "Lifetime",
    "NearSetting",
    "cache_lifetime",
    "exact_duplicates",
    "kept_out_by_temperature",
    "near_duplicates",
    "scope_of",
    "word_bags",
]

PREFILTER_COSINE = 0.7
PREFILTER_TOP_K = 4
PREFILTER_NOTE = (f"each question is compared with the {PREFILTER_TOP_K} earlier questions of its"
                  f" partition closest in words (word-bag cosine >= {PREFILTER_COSINE}), which"
                  " kept 99.4% of the pairs the embedder and verifier accept on labelled"
                  " question pairs")
_BAG_DIM = 1024
_EMBED_CHUNK = 128
_EMBED_THREADS = 4
_BLOCK = 512  # rows compared at once: a block of a partition against all before it
_WORD = re.compile(r"\w+")

Matrix = npt.NDArray[np.float32]


def scope_of(call: Call, scope: str) -> str:
    """The cache scope (``cache.exact.scope``) a call's entries live in."""
    if scope == "shared":
        return "shared"
    if scope == "user":
        return f"u:{len(call.tenant)}:{call.tenant}:{call.user}"
    return f"t:{call.tenant}"


#: How long a call's answer would stay in the exact cache (0: no expiry); None when the cache
#: would not store it (off for its feature or model).
Lifetime = Callable[[Call], float | None]


def cache_lifetime(config: CacheConfig) -> Lifetime:
    """The :data:`Lifetime` of calls under the cache's rules (:func:`merged_policy`)."""
    known: dict[tuple[str, str], float | None] = {}

    def lifetime(call: Call) -> float | None:
        key = (call.feature, _asked(call))
        if key not in known:
            policy = merged_policy(config, 1.0, *key)
            known[key] = policy.ttl_seconds if policy.enabled else None
        return known[key]

    return lifetime


def _expires(call: Call, ttl: float) -> float:
    return math.inf if call.ts is None or ttl <= 0 else call.ts + ttl


def exact_duplicates(calls: Sequence[Call], config: CacheConfig) -> list[bool]:
    """For each call (in time order), whether the exact cache would have served it: its key
    was stored before in its scope (and feature, if that has a policy of its own) and has not
    expired since."""
    lifetime = cache_lifetime(config)
    expiry: dict[tuple[str, str, str], float] = {}
    marks = []
    for call in calls:
        ttl = lifetime(call) if call.is_request and call.request_hash else None
        if ttl is None:
            marks.append(False)
            continue
        own = call.feature if call.feature in config.exact.features else ""
        key = (scope_of(call, config.exact.scope), own, call.request_hash)
        hit = key in expiry and (call.ts is None or call.ts < expiry[key])
        marks.append(hit)
        if not hit:
            expiry[key] = _expires(call, ttl)
    return marks


def kept_out_by_temperature(calls: Sequence[Call], marks: Sequence[bool],
                            config: CacheConfig) -> list[bool]:
    """Of the calls ``marks`` says are duplicates, those the cache's temperature rules as
    configured keep out (no temperature set where ``max_temperature`` is below the providers'
    default, or one above it): they are served once the request or the rules change."""
    return [marked and call.body is not None and temperature_bypass(
        merged_policy(config, 1.0, call.feature, _asked(call)), call.body) is not None
        for call, marked in zip(calls, marks, strict=True)]


def _asked(call: Call) -> str:
    """The model or route the call asked for (what the cache's rules are chosen by)."""
    asked = call.body.get("model") if call.body is not None else None
    return asked if isinstance(asked, str) else call.model


@dataclass(frozen=True)
class NearSetting:
    embedder: Embedder
    threshold: float
    verifier: bool
    max_question_chars: int
    scope: str
    lifetime: Lifetime


def _partitions(
    calls: Sequence[Call], exact: Sequence[bool], setting: NearSetting
) -> dict[tuple[str, str], list[tuple[int, str]]]:
    """``(scope, context digest) -> [(call index, question)]`` in time order."""
    found: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for i, call in enumerate(calls):
        if call.body is None or exact[i] or not call.is_request or setting.lifetime(call) is None:
            continue
        split = split_question(last_user_text(call.body["messages"]), setting.max_question_chars)
        if split is None or not split[1].strip():
            continue
        context, question = split
        key = (scope_of(call, setting.scope), context_digest(call.body, context))
        found[key].append((i, question))
    return found


def word_bags(texts: Sequence[str]) -> Matrix:
    """Unit rows of hashed lower-case word counts: the prefilter's cheap vectors."""
    rows: list[int] = []
    cols: list[int] = []
    for row, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        rows.extend([row] * len(words))
        cols.extend(zlib.crc32(w.encode()) % _BAG_DIM for w in words)
    flat = np.asarray(rows, dtype=np.int64) * _BAG_DIM + np.asarray(cols, dtype=np.int64)
    counts = np.bincount(flat, minlength=len(texts) * _BAG_DIM)
    bags = counts.astype(np.float32).reshape(len(texts), _BAG_DIM)
    norms = np.linalg.norm(bags, axis=1, keepdims=True)
    out: Matrix = bags / np.maximum(norms, 1e-12)
    return out


def _candidates(questions: Sequence[str]) -> list[list[int]]:
    """For each question, the earlier ones (indices) the prefilter lets through: at most
    :data:`PREFILTER_TOP_K`, the closest first."""
    bags = word_bags(questions)
    found: list[list[int]] = [[] for _ in questions]
    for start in range(0, len(questions), _BLOCK):
        block = bags[start:start + _BLOCK] @ bags[:start + _BLOCK].T
        rows, cols = np.nonzero(block >= PREFILTER_COSINE)
        earlier = cols < rows + start
        rows, cols = rows[earlier], cols[earlier]
        order = np.lexsort((-block[rows, cols], rows))  # by row, then closest first
        for r, c in zip(rows[order].tolist(), cols[order].tolist(), strict=True):
            hits = found[start + r]
            if len(hits) < PREFILTER_TOP_K:
                hits.append(c)
    return found


def near_duplicates(
    calls: Sequence[Call],
    exact: Sequence[bool],
    setting: NearSetting,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[bool]:
    """For each call (in time order), whether the semantic cache would have served it."""
    plans = [_plan(entries, setting.verifier)
             for entries in _partitions(calls, exact, setting).values() if len(entries) > 1]
    texts = sorted({entries[k][1] for entries, cands in plans
                    for j, cs in enumerate(cands) if cs for k in (j, *cs)})
    vectors = _embed(setting.embedder, texts, on_progress)
    marks = [False] * len(calls)
    for entries, cands in plans:
        served: set[int] = set()
        for j, earlier in enumerate(cands):
            question, asked = entries[j][1], calls[entries[j][0]].ts
            for i in earlier:
                stored = calls[entries[i][0]]
                ttl = setting.lifetime(stored) or 0.0
                if asked is not None and asked >= _expires(stored, ttl):
                    continue  # its entry has expired
                # a semantic hit is not indexed: nothing matches it
                if i not in served and float(
                        vectors[question] @ vectors[entries[i][1]]) >= setting.threshold:
                    served.add(j)
                    marks[entries[j][0]] = True
                    break
    return marks


def _plan(entries: list[tuple[int, str]], verifier: bool) -> tuple[list[tuple[int, str]],
                                                                  list[list[int]]]:
    """A partition's questions and, for each, the earlier ones it may match: those the
    prefilter lets through and, when the verifier is on, that it accepts. The verifier is
    asked before the embedder, which costs far more; the cache asks it after, on the same
    pairs, so the outcome is the same."""
    cands = _candidates([q for _, q in entries])
    if verifier:
        cands = [[i for i in cs if not compare(entries[j][1], entries[i][1]).kind]
                 for j, cs in enumerate(cands)]
    return entries, cands


def _embed(
    embedder: Embedder, texts: list[str], on_progress: Callable[[int, int], None] | None
) -> dict[str, Matrix]:
    """Vectors of ``texts``, embedded by as many threads as there are cores (embedders are
    thread-safe, and the local one runs each text on one core)."""
    chunks = [texts[i:i + _EMBED_CHUNK] for i in range(0, len(texts), _EMBED_CHUNK)]
    found: dict[str, Matrix] = {}
    with ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, _EMBED_THREADS))) as pool:
        for chunk, vectors in zip(chunks, pool.map(embedder.embed, chunks), strict=True):
            found.update(zip(chunk, vectors, strict=True))
            if on_progress is not None:
                on_progress(len(found), len(texts))
    return found
