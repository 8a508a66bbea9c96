"""Conversions between complete chat completions and their streamed chunks.

``StreamAssembler`` rebuilds the completion a stream delivered, so a streamed answer can be
cached and priced; ``chunks_from_completion`` replays a cached completion as a stream.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StreamAssembler", "chunks_from_completion", "is_complete", "is_truncated"]

JSON = dict[str, Any]
_FINISHED_OK = frozenset({"stop", "tool_calls", "function_call"})


class StreamAssembler:
    """Accumulates ``chat.completion.chunk`` objects into one ``chat.completion``."""

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.created = 0
        self.usage: JSON | None = None
        self._choices: dict[int, JSON] = {}
        self._texts: dict[int, list[str]] = {}
        self._tools: dict[int, dict[int, JSON]] = {}

    def add(self, chunk: JSON) -> None:
        self.id = self.id or chunk.get("id", "")
        self.model = self.model or chunk.get("model", "")
        self.created = self.created or chunk.get("created", 0)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            self._add_choice(choice)

    def _add_choice(self, choice: JSON) -> None:
        i = choice.get("index", 0)
        state = self._choices.setdefault(
            i, {"index": i, "finish_reason": None, "role": "assistant"}
        )
        delta = choice.get("delta") or {}
        if delta.get("role"):
            state["role"] = delta["role"]
        if delta.get("content"):
            self._texts.setdefault(i, []).append(delta["content"])
        for call in delta.get("tool_calls") or ():
            self._add_tool_delta(i, call)
        if choice.get("finish_reason"):
            state["finish_reason"] = choice["finish_reason"]
        if choice.get("logprobs") is not None:
            state.setdefault("logprobs", choice["logprobs"])

    def _add_tool_delta(self, i: int, call: JSON) -> None:
        calls = self._tools.setdefault(i, {})
        slot = calls.setdefault(
            call.get("index", 0),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if call.get("id"):
            slot["id"] = call["id"]
        fn = call.get("function") or {}
        if fn.get("name"):
            slot["function"]["name"] += fn["name"]
        if fn.get("arguments"):
            slot["function"]["arguments"] += fn["arguments"]

    def completion(self) -> JSON:
        choices = []
        for i in sorted(self._choices):
            state = self._choices[i]
            message: JSON = {
                "role": state["role"],
                "content": "".join(self._texts.get(i, ())) or None,
            }
            if i in self._tools:
                message["tool_calls"] = [self._tools[i][k] for k in sorted(self._tools[i])]
            elif message["content"] is None:
                message["content"] = ""
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": state.get("logprobs"),
                    "finish_reason": state["finish_reason"],
                }
            )
        body: JSON = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.usage is not None:
            body["usage"] = self.usage
        return body


def is_complete(completion: JSON) -> bool:
    """True when every choice finished normally (not cut, truncated or filtered)."""
    choices = completion.get("choices")
    if not choices:
        return False
    return all(c.get("finish_reason") in _FINISHED_OK for c in choices)


def is_truncated(completion: JSON) -> bool:
    """True when a choice was cut at its output-token limit (``finish_reason: length``)."""
    choices = completion.get("choices")
    return isinstance(choices, list) and any(
        isinstance(c, dict) and c.get("finish_reason") == "length" for c in choices)


def chunks_from_completion(completion: JSON, *, include_usage: bool) -> list[JSON]:
    """The stream a client would have received for ``completion``."""
    base = {
        "id": completion.get("id", ""),
        "object": "chat.completion.chunk",
        "created": completion.get("created", 0),
        "model": completion.get("model", ""),
    }
    out: list[JSON] = []
    for choice in completion.get("choices") or ():
        out.extend(_choice_chunks(base, choice))
    if include_usage and completion.get("usage"):
        out.append({**base, "choices": [], "usage": completion["usage"]})
    return out


def _choice_chunks(base: JSON, choice: JSON) -> list[JSON]:
    i = choice.get("index", 0)
    message = choice.get("message") or {}

    def chunk(delta: JSON, finish: str | None = None) -> JSON:
        return {
            **base,
            "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    out = [chunk({"role": message.get("role", "assistant"), "content": ""})]
    if message.get("content"):
        out.append(chunk({"content": message["content"]}))
    for k, call in enumerate(message.get("tool_calls") or ()):
        out.append(chunk({"tool_calls": [{"index": k, **call}]}))
    out.append(chunk({}, choice.get("finish_reason") or "stop"))
    return out
