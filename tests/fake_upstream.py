"""A fake LLM provider on loopback that speaks the OpenAI and Anthropic wire formats.

``FakeUpstream`` runs an aiohttp server in a background thread with its own event loop, so
synchronous tests (the official SDKs, sync clients) talk to it as to a real provider::

    with FakeUpstream() as fake:
        openai.OpenAI(base_url=fake.base_url, api_key="k")        # POST /v1/chat/completions ...
        anthropic.Anthropic(base_url=fake.root_url, api_key="k")  # POST /v1/messages

Answers are deterministic. The assistant says ``"echo: " + <text of the last user message>``;
token counts are words: prompt = sum over messages of ``len(text.split()) + 3`` (plus the words
of an Anthropic ``system``), completion = words of the answer (10 per tool call). A request with
``tools`` whose last message is a user turn mentioning "weather" gets a call of the first tool
with arguments ``{"city": "Paris"}``. ``answer_as(model, text)`` makes requests for one model
(the name in the request body) say ``text`` instead of the echo, until ``reset``.

Faults come from the queue (``fail_next``: chat, messages and model-list requests, first in first out)
or else from markers in the last user message, combinable: ``[[fault:status=429,retry_after=1]]``,
``[[fault:delay=0.5]]``, ``[[fault:cut=3]]``, ``[[fault:chunk_delay=0.2]]``,
``[[fault:no_usage]]``, ``[[fault:length]]``, ``[[fault:malformed]]``. Usage markers, anywhere in
the prompt, report parts of the usage as each API does:

* ``[[cached=K]]``: ``min(K, prompt tokens)`` prompt tokens read from the prompt cache (OpenAI
  ``prompt_tokens_details.cached_tokens``, Anthropic ``cache_read_input_tokens``);
* ``[[cache_write=K]]``: ``min(K, prompt tokens - cached)`` prompt tokens written to it
  (Anthropic ``cache_creation_input_tokens``; OpenAI ``prompt_tokens_details.cache_write_tokens``);
* ``[[audio_in=K]]``: ``min(K, prompt tokens)`` of the prompt tokens are audio
  (``prompt_tokens_details.audio_tokens``);
* ``[[reasoning=K]]`` and ``[[audio_out=K]]``: K more completion tokens, reported as reasoning
  (``completion_tokens_details.reasoning_tokens``) or audio (``completion_tokens_details.audio_tokens``).

Anthropic's ``input_tokens`` leave out the cache reads and writes. Markers stay in the echoed
text. Embeddings honour the status, delay and malformed markers of their inputs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import math
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from aiohttp import web

from tests.fake_batches import FakeBatches

__all__ = ["FakeUpstream", "Fault", "Recorded", "main"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorRenderer = Callable[[int, str, float | None], web.Response]

MODELS = ("gpt-4o-mini", "gpt-4o", "qwen3-8b", "text-embedding-3-small",
          "claude-3-5-sonnet-latest", "claude-3-5-haiku-latest")
TOOL_ARGUMENTS = '{"city": "Paris"}'
TOOL_ARGUMENT_PIECES = ('{"', 'city": "', 'Paris"}')
TOOL_TOKENS = 10
EMBEDDING_DIMENSIONS = 8

_FAULT_MARKER = re.compile(r"\[\[fault:([^\]]*)\]\]")
_USAGE_MARKER = re.compile(r"\[\[(cached|cache_write|audio_in|reasoning|audio_out)=(\d+)\]\]")
_LOGPROB_MARKER = re.compile(r"\[\[logprob=(-?[\d.]+)\]\]")
_WORD_BOUNDARY = re.compile(r"(?<=\s)(?=\S)")
_OPENAI_ERRORS = {400: ("invalid_request_error", "invalid_request"),
                  401: ("invalid_request_error", "invalid_api_key"),
                  403: ("permission_error", "permission_denied"),
                  404: ("invalid_request_error", "model_not_found"),
                  429: ("rate_limit_error", "rate_limit_exceeded")}
_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                     403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                     429: "rate_limit_error", 529: "overloaded_error"}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _flag(raw: str) -> bool:
    return raw.lower() in {"1", "true", "yes", "on"}


# A bare marker name (``[[fault:status]]``) takes this value.
_BARE = {"status": "500", "delay": "1", "cut": "1", "chunk_delay": "0.1"}
_FIELD_TYPES: dict[str, Callable[[str], Any]] = {
    "status": int, "retry_after": float, "message": str, "delay": float, "chunk_delay": float,
    "cut": int, "no_usage": _flag, "length": _flag, "malformed": _flag}


@dataclass(frozen=True)
class Fault:
    """What to break in one answer; set fields combine (a delay, then a status, for instance).

    status: answer with this HTTP status and a provider-shaped error body.
    retry_after: seconds sent in the ``Retry-After`` header of an error answer.
    delay: seconds to wait before answering; the wait is cancelled if the client goes away.
    chunk_delay: seconds to wait between stream events.
    cut: a stream sends this many events, then drops the connection (no ``[DONE]`` or
        ``message_stop``); a plain answer sends this many bytes of a body whose Content-Length
        announces all of it, then drops the connection.
    no_usage: leave usage out of the answer, and out of the stream even when it was asked for.
    length: stop early at half the words, finish_reason "length" / stop_reason "max_tokens".
    malformed: status 200 with a body (or stream event) that is not JSON.
    """

    status: int | None = None
    retry_after: float | None = None
    message: str = "injected fault"
    delay: float = 0.0
    chunk_delay: float = 0.0
    cut: int | None = None
    no_usage: bool = False
    length: bool = False
    malformed: bool = False

    @classmethod
    def parse(cls, spec: str, **params: Any) -> Fault:
        """Build from ``"name[=value],..."`` then ``params``; unknown names raise ValueError."""
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, raw = item.partition("=")
            if name not in _FIELD_TYPES:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(_FIELD_TYPES)}")
            values[name] = _FIELD_TYPES[name](raw or _BARE.get(name, "true"))
        return replace(cls(), **{**values, **params})


@dataclass(frozen=True)
class Recorded:
    """One request as received; header names are lower-cased, ``body`` is the JSON object."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    raw: bytes


@dataclass(frozen=True)
class _Reply:
    """The answer to give, whatever the wire format: one text and finish reason per choice."""

    texts: tuple[str, ...]
    finishes: tuple[str, ...]
    tool: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cache_write_tokens: int = 0
    input_audio_tokens: int = 0
    reasoning_tokens: int = 0
    output_audio_tokens: int = 0


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _text(content: Any) -> str:
    """The text of a message content: a string, or the text of its text and tool-result parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = (_part_text(part) for part in content if isinstance(part, dict))
    return " ".join(text for text in texts if text)


def _part_text(part: dict[str, Any]) -> str:
    if part.get("type") == "text":
        return str(part.get("text", ""))
    if part.get("type") == "tool_result":
        return _text(part.get("content"))
    return ""


def _last_user_text(messages: list[Any]) -> str:
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return _text(users[-1].get("content")) if users else ""


def _all_text(messages: list[Any], system: str) -> str:
    return " ".join([system, *(_text(m.get("content")) for m in messages if isinstance(m, dict))])


def _prompt_tokens(messages: list[Any], system: str) -> int:
    counted = (len(_text(m.get("content")).split()) + 3 for m in messages if isinstance(m, dict))
    return sum(counted) + len(system.split())


def _usage_parts(reply: _Reply, prompt_text: str) -> _Reply:
    """``reply`` with the usage its prompt's markers ask for (see the module docstring)."""
    asked = {name: int(k) for name, k in _USAGE_MARKER.findall(prompt_text)}
    prompt = reply.prompt_tokens
    cached = min(asked.get("cached", 0), prompt)
    reasoning, audio_out = asked.get("reasoning", 0), asked.get("audio_out", 0)
    return replace(
        reply, cached_tokens=cached,
        cache_write_tokens=min(asked.get("cache_write", 0), prompt - cached),
        input_audio_tokens=min(asked.get("audio_in", 0), prompt),
        reasoning_tokens=reasoning, output_audio_tokens=audio_out,
        completion_tokens=reply.completion_tokens + reasoning + audio_out)


def _marker_fault(text: str) -> Fault:
    return Fault.parse(",".join(_FAULT_MARKER.findall(text)))


def _truncate(text: str, limit: int | None, force: bool) -> tuple[str, bool]:
    """Cut ``text`` to ``limit`` words (to half its words when ``force``); say if it was cut."""
    words = text.split()
    cap = len(words) if limit is None else limit
    if force:
        cap = min(cap, max(1, len(words) // 2))
    if cap >= len(words) and not force:
        return text, False
    return " ".join(words[:cap]), True


def _pieces(text: str) -> list[str]:
    """Word-sized pieces whose concatenation is exactly ``text``."""
    return [piece for piece in _WORD_BOUNDARY.split(text) if piece]


def _plan(body: dict[str, Any], system: str, tool: str | None, fault: Fault,
          scripted: str | None = None) -> _Reply:
    """Decide the answer to a chat or messages request (``n`` choices, limits, usage);
    ``scripted`` replaces the echoed text."""
    messages: list[Any] = body["messages"]
    text, n = _last_user_text(messages), int(body.get("n") or 1)
    prompt = _prompt_tokens(messages, system)
    parts = _all_text(messages, system)
    if tool is not None:
        return _usage_parts(
            _Reply(("",) * n, ("tool_calls",) * n, tool, prompt, 0, TOOL_TOKENS * n), parts)
    json_mode = (body.get("response_format") or {}).get("type") in {"json_object", "json_schema"}
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    answers = [_truncate(_answer(text, i, json_mode, scripted), limit, fault.length)
               for i in range(n)]
    texts = tuple(answer for answer, _ in answers)
    finishes = tuple("length" if cut else "stop" for _, cut in answers)
    completion = sum(len(answer.split()) for answer in texts)
    return _usage_parts(_Reply(texts, finishes, None, prompt, 0, completion), parts)


def _answer(text: str, index: int, json_mode: bool, scripted: str | None = None) -> str:
    suffix = f" #{index}" if index else ""
    if scripted is not None:
        return scripted + suffix
    return json.dumps({"echo": text + suffix}) if json_mode else f"echo: {text}{suffix}"


def _openai_tool(body: dict[str, Any]) -> str | None:
    """The tool to call: the first one, when the user just asked about the weather."""
    tools, messages = body.get("tools"), body["messages"]
    if not tools or body.get("tool_choice") == "none" or not messages:
        return None
    if messages[-1].get("role") != "user" or "weather" not in _last_user_text(messages).lower():
        return None
    return str(tools[0].get("function", {}).get("name", "tool"))


def _openai_usage(reply: _Reply) -> dict[str, Any]:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens,
                                      "cache_write_tokens": reply.cache_write_tokens,
                                      "audio_tokens": reply.input_audio_tokens},
            "completion_tokens_details": {"reasoning_tokens": reply.reasoning_tokens,
                                          "audio_tokens": reply.output_audio_tokens}}


def _openai_message(reply: _Reply, index: int) -> dict[str, Any]:
    if reply.tool is None:
        return {"role": "assistant", "content": reply.texts[index], "refusal": None}
    call = {"id": "call_1", "type": "function",
            "function": {"name": reply.tool, "arguments": TOOL_ARGUMENTS}}
    return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}


def _chat_completion(head: dict[str, Any], reply: _Reply, fault: Fault) -> dict[str, Any]:
    choices = [{"index": i, "message": _openai_message(reply, i), "logprobs": None,
                "finish_reason": finish} for i, finish in enumerate(reply.finishes)]
    payload = {**head, "object": "chat.completion", "choices": choices}
    if not fault.no_usage:
        payload["usage"] = _openai_usage(reply)
    return payload


def _add_logprobs(payload: dict[str, Any], prompt: str) -> None:
    """Per-token logprobs when asked for: every token gets the marker's ``[[logprob=X]]``
    value (default -0.01), so a test controls the answer's confidence."""
    found = _LOGPROB_MARKER.search(prompt)
    value = float(found.group(1)) if found else -0.01
    for choice in payload["choices"]:
        words = (choice["message"].get("content") or "").split()
        choice["logprobs"] = {"content": [{"token": w, "logprob": value, "bytes": None,
                                           "top_logprobs": []} for w in words]}


def _openai_deltas(reply: _Reply, index: int) -> Iterator[dict[str, Any]]:
    if reply.tool is None:
        yield {"role": "assistant", "content": ""}
        yield from ({"content": piece} for piece in _pieces(reply.texts[index]))
        return
    start = {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": reply.tool, "arguments": ""}}
    yield {"role": "assistant", "content": None, "tool_calls": [start]}
    for piece in TOOL_ARGUMENT_PIECES:
        yield {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}


def _chat_chunks(head: dict[str, Any], reply: _Reply, usage: bool) -> Iterator[dict[str, Any]]:
    """The chunks of a streamed chat completion, choice after choice, usage last if asked."""
    base = {**head, "object": "chat.completion.chunk", **({"usage": None} if usage else {})}
    for index, finish in enumerate(reply.finishes):
        for delta in _openai_deltas(reply, index):
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
            yield {**base, "choices": [choice]}
        end = {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}
        yield {**base, "choices": [end]}
    if usage:
        yield {**base, "choices": [], "usage": _openai_usage(reply)}


def _anthropic_tool(body: dict[str, Any]) -> str | None:
    """The tool to use: the first one, when the user (not a tool result) asks about the weather."""
    tools, messages = body.get("tools"), body["messages"]
    if not tools or (body.get("tool_choice") or {}).get("type") == "none" or not messages:
        return None
    last = messages[-1]
    content = last.get("content")
    answered = isinstance(content, list) and any(
        isinstance(p, dict) and p.get("type") == "tool_result" for p in content)
    if last.get("role") != "user" or answered or "weather" not in _text(content).lower():
        return None
    return str(tools[0].get("name", "tool"))


def _anthropic_usage(reply: _Reply) -> dict[str, int]:
    # Anthropic's input_tokens leave out the tokens read from and written to its prompt cache.
    return {"input_tokens": reply.prompt_tokens - reply.cached_tokens - reply.cache_write_tokens,
            "output_tokens": reply.completion_tokens,
            "cache_read_input_tokens": reply.cached_tokens,
            "cache_creation_input_tokens": reply.cache_write_tokens}


def _anthropic_block(reply: _Reply) -> dict[str, Any]:
    if reply.tool is None:
        return {"type": "text", "text": reply.texts[0]}
    return {"type": "tool_use", "id": "toolu_1", "name": reply.tool, "input": {"city": "Paris"}}


def _anthropic_message(head: dict[str, Any], reply: _Reply, fault: Fault) -> dict[str, Any]:
    message = {**head, "content": [_anthropic_block(reply)],
               "stop_reason": _STOP_REASONS[reply.finishes[0]], "stop_sequence": None}
    if not fault.no_usage:
        message["usage"] = _anthropic_usage(reply)
    return message


def _anthropic_events(head: dict[str, Any], reply: _Reply,
                      fault: Fault) -> Iterator[tuple[str, dict[str, Any]]]:
    """The named events of a streamed message, up to (not including) ``message_stop``."""
    usage = _anthropic_usage(reply)
    start = {**head, "content": [], "stop_reason": None, "stop_sequence": None}
    if not fault.no_usage:
        start["usage"] = {**usage, "output_tokens": 1}
    yield "message_start", {"type": "message_start", "message": start}
    block = _anthropic_block(reply)
    empty = {**block, "input": {}} if reply.tool else {**block, "text": ""}
    yield "content_block_start", {"type": "content_block_start", "index": 0, "content_block": empty}
    yield "ping", {"type": "ping"}
    deltas = ({"type": "input_json_delta", "partial_json": p} for p in TOOL_ARGUMENT_PIECES) \
        if reply.tool else ({"type": "text_delta", "text": p} for p in _pieces(reply.texts[0]))
    for delta in deltas:
        yield "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    delta_event: dict[str, Any] = {"type": "message_delta", "delta": {
        "stop_reason": _STOP_REASONS[reply.finishes[0]], "stop_sequence": None}}
    if not fault.no_usage:
        delta_event["usage"] = {"output_tokens": usage["output_tokens"]}
    yield "message_delta", delta_event


def _retry_headers(retry_after: float | None) -> dict[str, str]:
    return {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}


def _openai_error(status: int, message: str, retry_after: float | None = None) -> web.Response:
    default = ("server_error" if status >= 500 else "invalid_request_error", None)
    kind, code = _OPENAI_ERRORS.get(status, default)
    error = {"message": message, "type": kind, "param": None, "code": code}
    return web.json_response({"error": error}, status=status, headers=_retry_headers(retry_after))


def _anthropic_error(status: int, message: str, retry_after: float | None = None) -> web.Response:
    error = {"type": _ANTHROPIC_ERRORS.get(status, "api_error"), "message": message}
    return web.json_response({"type": "error", "error": error}, status=status,
                             headers=_retry_headers(retry_after))


def _embedding_inputs(raw: Any) -> list[str]:
    """Each input as text; token arrays are embedded by their JSON spelling."""
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list):
        return []
    if raw and all(isinstance(item, int) for item in raw):
        return [json.dumps(raw)]
    return [item if isinstance(item, str) else json.dumps(item) for item in raw]


def _vector(text: str, dimensions: int) -> list[float]:
    """A unit vector derived from a hash of ``text``: equal texts, equal vectors."""
    blocks = math.ceil(dimensions / 8)
    raw = b"".join(hashlib.sha256(f"{i}:{text}".encode()).digest() for i in range(blocks))
    values = [v / 2**31 - 1.0 for v in struct.unpack(f"<{dimensions}I", raw[: 4 * dimensions])]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding != "base64":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(data)}\n\n".encode()


def _drop(request: web.Request) -> None:
    """Close the connection under the response, as a crashing provider would."""
    if request.transport is not None:
        request.transport.close()


class FakeUpstream:
    """An OpenAI- and Anthropic-compatible server on loopback, run in a background thread.

    ``requests`` holds every request received, in order; ``disconnects`` counts requests whose
    client went away before the answer was complete (a cancelled delay, a failed stream write).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: list[Recorded] = []
        self.disconnects = 0
        self.root_url = ""
        self.base_url = ""
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque()
        self._scripts: dict[str, str] = {}
        self._answerers: list[Callable[[dict[str, Any]], str | None]] = []
        self.batches = FakeBatches(self._offline_answer, lambda: self.root_url)
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> FakeUpstream:
        """Serve from a background thread; return once the port is bound and the URLs are set."""
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None or not self.root_url:
            raise RuntimeError("the fake upstream did not start") from self._error
        return self

    def stop(self) -> None:
        """Stop serving (in-flight handlers are cancelled) and join the thread."""
        if self._thread is None or self._loop is None or self._stopping is None:
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)
        self._thread = self._loop = self._stopping = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget the recorded requests, the queued faults and the disconnect count."""
        with self._lock:
            self.requests.clear()
            self._faults.clear()
            self._scripts.clear()
            self._answerers.clear()
            self.disconnects = 0
        self.batches.reset()

    def fail_next(self, fault: Fault | str, times: int = 1, **params: Any) -> None:
        """Break the next ``times`` chat, messages or model-list requests with ``fault``.

        A string is a marker body such as ``"status=429,retry_after=1"`` or ``"no_usage"``;
        ``params`` set or override fields, e.g. ``fail_next("status", status=503)``.
        """
        item = Fault.parse(fault, **params) if isinstance(fault, str) else replace(fault, **params)
        with self._lock:
            self._faults.extend([item] * times)

    def answer_as(self, model: str, text: str) -> None:
        """Answer chat and messages requests for ``model`` with ``text`` (each choice of a
        request with ``n`` gets it, suffixed like the echo) until :meth:`reset`."""
        with self._lock:
            self._scripts[model] = text

    def add_answerer(self, answerer: Callable[[dict[str, Any]], str | None]) -> None:
        """Let ``answerer(body)`` answer chat and messages requests it recognises (it returns
        the answer's text, or None to pass) until :meth:`reset`; ``answer_as`` scripts win."""
        with self._lock:
            self._answerers.append(answerer)

    def _script(self, body: dict[str, Any]) -> str | None:
        with self._lock:
            scripted = self._scripts.get(str(body.get("model")))
            answerers = list(self._answerers)
        if scripted is not None:
            return scripted
        for answerer in answerers:
            text = answerer(body)
            if text is not None:
                return text
        return None

    def _offline_answer(self, body: dict[str, Any], api: str) -> dict[str, Any]:
        """What the live endpoint answers ``body`` (no faults): a batch line's result."""
        ident = next(self._ids)
        if api == "anthropic":
            reply = _plan({**body, "n": 1}, _text(body.get("system")), _anthropic_tool(body),
                          Fault(), self._script(body))
            head = {"id": f"msg_fake_{ident}", "type": "message", "role": "assistant",
                    "model": body.get("model")}
            return _anthropic_message(head, reply, Fault())
        reply = _plan(body, "", _openai_tool(body), Fault(), self._script(body))
        head = {"id": f"chatcmpl-fake-{ident}", "created": int(time.time()),
                "model": body.get("model"), "system_fingerprint": "fp_fake"}
        return _chat_completion(head, reply, Fault())

    def calls(self, path: str = "/v1/chat/completions") -> list[Recorded]:
        """The recorded requests to ``path``, in order."""
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def wait_for_disconnects(self, count: int = 1, timeout: float = 2.0) -> bool:
        """Wait until at least ``count`` disconnects were seen; say whether they were."""
        deadline = time.monotonic() + timeout
        while self.disconnects < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.disconnects >= count

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as exc:  # handed to start(), which raises it in the caller's thread
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        # Cancelling handlers when the client goes away is what lets tests see disconnects.
        runner = web.AppRunner(self._app(), handler_cancellation=True, shutdown_timeout=0.2,
                               access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
            port = runner.addresses[0][1]
            self.root_url = f"http://{self._host}:{port}"
            self.base_url = f"{self.root_url}/v1"
            self._ready.set()
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._record], client_max_size=64 * 1024**2)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        self.batches.routes(app)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        with self._lock:
            self.requests.append(Recorded(request.path, headers, _json_object(raw), raw))
        try:
            return await handler(request)
        except asyncio.CancelledError:
            self._count_disconnect()
            raise
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            # A field of the wrong type: a real vendor validates its input and answers 400.
            render = _anthropic_error if request.path == "/v1/messages" else _openai_error
            return render(400, f"invalid request: {type(exc).__name__}", None)

    def _count_disconnect(self) -> None:
        with self._lock:
            self.disconnects += 1

    def _take_fault(self, text: str) -> Fault:
        with self._lock:
            if self._faults:
                return self._faults.popleft()
        return _marker_fault(text)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = _json_object(await request.read())
        if body is None or not isinstance(body.get("messages"), list):
            return _openai_error(400, "messages: a list of messages is required")
        fault = self._take_fault(_last_user_text(body["messages"]))
        stream = bool(body.get("stream"))
        early = await _prelude(fault, _openai_error, stream)
        if early is not None:
            return early
        reply = _plan(body, "", _openai_tool(body), fault, self._script(body))
        head = {"id": f"chatcmpl-fake-{next(self._ids)}", "created": int(time.time()),
                "model": body.get("model"), "system_fingerprint": "fp_fake"}
        if not stream:
            payload = _chat_completion(head, reply, fault)
            if body.get("logprobs"):
                _add_logprobs(payload, _last_user_text(body["messages"]))
            return await _send_json(request, payload, fault)
        usage = bool((body.get("stream_options") or {}).get("include_usage")) and not fault.no_usage
        events = [_sse(chunk) for chunk in _chat_chunks(head, reply, usage)]
        return await self._send_events(request, events, b"data: [DONE]\n\n", fault)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = _json_object(await request.read())
        problem = _anthropic_problem(request, body)
        if problem is not None or body is None:
            return problem or _anthropic_error(400, "the body must be a JSON object")
        fault = self._take_fault(_last_user_text(body["messages"]))
        stream = bool(body.get("stream"))
        early = await _prelude(fault, _anthropic_error, stream)
        if early is not None:
            return early
        reply = _plan({**body, "n": 1}, _text(body.get("system")), _anthropic_tool(body), fault,
                      self._script(body))
        head = {"id": f"msg_fake_{next(self._ids)}", "type": "message", "role": "assistant",
                "model": body.get("model")}
        if not stream:
            return await _send_json(request, _anthropic_message(head, reply, fault), fault)
        events = [_sse(data, name) for name, data in _anthropic_events(head, reply, fault)]
        stop = _sse({"type": "message_stop"}, "message_stop")
        return await self._send_events(request, events, stop, fault)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = _json_object(await request.read()) or {}
        texts = _embedding_inputs(body.get("input"))
        if not texts:
            return _openai_error(400, "input: a string or a list of strings is required")
        early = await _prelude(_marker_fault(" ".join(texts)), _openai_error, False)
        if early is not None:
            return early
        dimensions = int(body.get("dimensions") or EMBEDDING_DIMENSIONS)
        encoding = str(body.get("encoding_format") or "float")
        data = [{"object": "embedding", "index": i,
                 "embedding": _encode(_vector(text, dimensions), encoding)}
                for i, text in enumerate(texts)]
        tokens = sum(len(text.split()) for text in texts)
        return web.json_response({"object": "list", "data": data, "model": body.get("model"),
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _models(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's model list, or Anthropic's (the claude models) for a request that sends
        ``anthropic-version``."""
        anthropic = "anthropic-version" in request.headers
        early = await _prelude(self._take_fault(""),
                               _anthropic_error if anthropic else _openai_error, False)
        if early is not None:
            return early
        if anthropic:
            names = [name for name in MODELS if name.startswith("claude")]
            return web.json_response({
                "data": [{"type": "model", "id": name, "display_name": name,
                          "created_at": "2024-10-22T00:00:00Z"} for name in names],
                "has_more": False, "first_id": names[0], "last_id": names[-1]})
        data = [{"id": name, "object": "model", "created": 1700000000, "owned_by": "fake"}
                for name in MODELS]
        return web.json_response({"object": "list", "data": data})

    async def _send_events(self, request: web.Request, events: list[bytes], terminator: bytes,
                           fault: Fault) -> web.StreamResponse:
        """Stream server-sent events; a cut stops after ``fault.cut`` of them and drops."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        to_send = events if fault.cut is None else events[: fault.cut]
        try:
            for number, event in enumerate(to_send):
                if number and fault.chunk_delay:
                    await asyncio.sleep(fault.chunk_delay)
                await response.write(event)
            if fault.cut is not None:
                _drop(request)
                return response
            await response.write(terminator)
        except ConnectionResetError:
            self._count_disconnect()
        return response


def _anthropic_problem(request: web.Request, body: dict[str, Any] | None) -> web.Response | None:
    """The error the real Messages API gives for a request missing what it requires, if any."""
    # Recent Anthropic SDKs send the key as a bearer token rather than in x-api-key.
    if "x-api-key" not in request.headers and "authorization" not in request.headers:
        return _anthropic_error(401, "x-api-key header is required")
    if "anthropic-version" not in request.headers:
        return _anthropic_error(400, "anthropic-version: header is required")
    if body is None or not isinstance(body.get("messages"), list):
        return _anthropic_error(400, "messages: Field required")
    if not isinstance(body.get("max_tokens"), int):
        return _anthropic_error(400, "max_tokens: Field required")
    return None


async def _prelude(fault: Fault, render_error: ErrorRenderer,
                   stream: bool) -> web.Response | None:
    """Wait out the delay, then answer early for a status or malformed fault."""
    if fault.delay:
        await asyncio.sleep(fault.delay)
    if fault.status is not None:
        return render_error(fault.status, fault.message, fault.retry_after)
    if not fault.malformed:
        return None
    if stream:
        return web.Response(text="data: {not json\n\n", content_type="text/event-stream")
    return web.Response(text="<html>this is not json {", content_type="application/json")


async def _send_json(request: web.Request, payload: dict[str, Any],
                     fault: Fault) -> web.StreamResponse:
    """Answer with JSON; a cut sends only the first ``fault.cut`` bytes, then drops."""
    data = json.dumps(payload).encode()
    if fault.cut is None:
        return web.Response(body=data, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(data)
    await response.prepare(request)
    with contextlib.suppress(ConnectionResetError):
        await response.write(data[: min(fault.cut, len(data) - 1)])
    _drop(request)
    return response


def main(argv: list[str] | None = None) -> None:
    """Run the fake upstream in the foreground until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m tests.fake_upstream",
                                     description="Fake OpenAI/Anthropic upstream on loopback.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with FakeUpstream(host=args.host, port=args.port) as fake:
        print(f"OpenAI base_url {fake.base_url}  Anthropic base_url {fake.root_url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
