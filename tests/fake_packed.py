"""An answerer for the fake upstream that speaks batch_map's packed prompt format.

Register it with ``fake.add_answerer(PackedAnswerer(...))``. It recognises a packed request (a
system message asking for ``{"results": [...]}`` and a last user message holding a JSON array
of ``{"id", "input"}``) and answers each item with a deterministic classification of its input:
``negative`` when it holds a negative word, else ``positive`` (``{"label": ...}`` with
``as_object``).

Faults, to exercise the runner's checks and retries: a fraction of items ``drop``ped from the
answer, ``duplicate``d with a conflicting output, or ``malformed`` (a result without its
output). Whether an item is hit is drawn from a hash of the seed, the item's input and how many
times this answerer has seen it, so a run is reproducible whatever order calls arrive in, and a
retried item gets a fresh draw. An input containing ``[[item:garbage]]`` is always malformed.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["ALWAYS_MALFORMED", "NEGATIVE_WORDS", "PackedAnswerer", "classify", "packed_items"]

NEGATIVE_WORDS = ("bad", "terrible", "awful", "hate", "poor", "broken", "worst", "refund",
                  "slow", "disappointed")
ALWAYS_MALFORMED = "[[item:garbage]]"
_MARKER = '{"results": [{"id":'


def classify(text: Any) -> str:
    """The label the answerer gives an input."""
    words = str(text).lower()
    return "negative" if any(word in words for word in NEGATIVE_WORDS) else "positive"


def _content(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def packed_items(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The items of a packed request, or None when ``body`` is not one."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    system = _content(messages[0]) if messages[0].get("role") == "system" else ""
    system = system or str(body.get("system") or "")  # an Anthropic request
    if _MARKER not in system and _MARKER not in str(body.get("system", "")):
        return None
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    try:
        items = json.loads(_content(users[-1])) if users else None
    except ValueError:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) and "id" in i for i in items):
        return None
    return items


class PackedAnswerer:
    def __init__(self, *, drop: float = 0.0, duplicate: float = 0.0, malformed: float = 0.0,
                 seed: int = 0, as_object: bool = False,
                 label: Callable[[Any], str] | None = None) -> None:
        """``label``: what an input is answered (default :func:`classify`)."""
        self.label = label or classify
        self.drop, self.duplicate, self.malformed = drop, duplicate, malformed
        self.seed = seed
        self.as_object = as_object
        self.seen: Counter[str] = Counter()  # times each input was asked
        self.calls = 0
        self.items = 0  # items asked, over all calls
        self.faults: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _draw(self, text: str) -> float:
        with self._lock:
            self.seen[text] += 1
            nth = self.seen[text]
        digest = hashlib.sha256(f"{self.seed}\0{nth}\0{text}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def output(self, text: Any) -> Any:
        label = self.label(text)
        return {"label": label} if self.as_object else label

    def _results(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        ident, text = item["id"], item.get("input")
        draw = self._draw(json.dumps(text, sort_keys=True))
        good = {"id": ident, "output": self.output(text)}
        if ALWAYS_MALFORMED in str(text):
            return [{"id": ident}]
        if draw < self.drop:
            self.faults["drop"] += 1
            return []
        if draw < self.drop + self.duplicate:
            self.faults["duplicate"] += 1
            return [good, {"id": ident, "output": f"not {good['output']}"}]
        if draw < self.drop + self.duplicate + self.malformed:
            self.faults["malformed"] += 1
            return [{"id": ident, "answer": good["output"]}]
        return [good]

    def __call__(self, body: dict[str, Any]) -> str | None:
        items = packed_items(body)
        if items is None:
            return None
        with self._lock:
            self.calls += 1
            self.items += len(items)
        results = [r for item in items for r in self._results(item)]
        return json.dumps({"results": results})
