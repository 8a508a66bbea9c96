"""Values derived from texts (word bags, line sets), remembered for texts that come back.

Prompts re-send the same worked examples, documents and system prompts request after request;
splitting them again is wasted work. But remembering every text costs more than it saves when
texts never come back: the values kept grow cold in memory, and dropping them for new ones
touches that memory again. So a text's value is kept only from the second time the text is
seen (a direct-mapped table of hashes remembers what was seen once: one int a slot, nothing
to evict), and at most ``size`` values are kept, least recently used dropped first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import _CacheInfo, lru_cache
from typing import Generic, TypeVar

__all__ = ["Remembered", "SeenOnce"]

T = TypeVar("T")


class SeenOnce:
    """The keys seen, about the last ``slots`` of them: a direct-mapped table of hashes, one
    int a slot, nothing to evict (a key pushed out is merely seen afresh)."""

    def __init__(self, slots: int = 8192) -> None:
        self._table = [0] * slots

    def again(self, key: int) -> bool:
        """Whether ``key`` was seen before; noted now when it was not."""
        table = self._table
        slot = key % len(table)
        if table[slot] == key:
            return True
        table[slot] = key
        return False

    def clear(self) -> None:
        self._table = [0] * len(self._table)


class Remembered(Generic[T]):
    """``make(text)``, remembered for a text of at most ``max_chars`` characters seen before
    (among about the last ``seen`` texts); at most ``size`` values kept. Thread-safe."""

    def __init__(self, make: Callable[[str], T], *, size: int, max_chars: int,
                 seen: int = 8192) -> None:
        self._make = make
        self._kept = lru_cache(maxsize=size)(make)
        self._max_chars = max_chars
        self._seen = SeenOnce(seen)

    def __call__(self, text: str) -> T:
        return self.many((text,))[0]

    def many(self, texts: Iterable[str]) -> list[T]:
        """``make(text)`` of each text (one call for many: most texts are new, and their
        lookup must cost next to nothing)."""
        make, kept, again, longest = (self._make, self._kept, self._seen.again,
                                      self._max_chars)
        out: list[T] = []
        for text in texts:
            if len(text) <= longest and again(hash(text)):
                out.append(kept(text))
            else:  # long, or seen once: remembered from the next time
                out.append(make(text))
        return out

    def known(self, text: str) -> T | None:
        """``make(text)`` when ``text`` was seen before (made now, and kept, the second time);
        None the first time, when it is only noted: for a value only worth making for a text
        that comes back."""
        if len(text) <= self._max_chars and self._seen.again(hash(text)):
            return self._kept(text)
        return None

    def clear(self) -> None:
        self._seen.clear()
        self._kept.cache_clear()

    def info(self) -> _CacheInfo:
        """Hits, misses and values kept (a miss: a text seen before, its value now kept)."""
        return self._kept.cache_info()
