"""Values derived from texts are kept from a text's second sighting, bounded, and always equal
to what making them afresh gives."""

from __future__ import annotations

from skinflint.remembered import Remembered


def _maker(calls: list[str]) -> Remembered[tuple[str, ...]]:
    def make(text: str) -> tuple[str, ...]:
        calls.append(text)
        return tuple(text.split())
    return Remembered(make, size=3, max_chars=20, seen=1 << 20)  # slots shared: unlikely


def test_a_text_is_kept_from_its_second_sighting() -> None:
    calls: list[str] = []
    words = _maker(calls)
    for _ in range(4):
        assert words("a b c") == ("a", "b", "c")
    assert calls == ["a b c", "a b c"]  # once when first seen, once to keep it
    info = words.info()
    assert (info.hits, info.misses, info.currsize) == (2, 1, 1)


def test_texts_seen_once_are_never_kept() -> None:
    calls: list[str] = []
    words = _maker(calls)
    texts = [f"text {i}" for i in range(50)]
    assert [words(t) for t in texts] == [tuple(t.split()) for t in texts]
    assert words.info().currsize == 0 and len(calls) == 50


def test_what_is_kept_is_bounded_and_the_oldest_goes_first() -> None:
    calls: list[str] = []
    words = _maker(calls)
    texts = [f"text {i}" for i in range(5)]
    for _ in range(3):
        for t in texts:
            assert words(t) == tuple(t.split())
    assert words.info().currsize == 3
    calls.clear()
    words("text 4")
    assert calls == []  # recently used: still kept
    words("text 0")
    assert calls == ["text 0"]  # pushed out by newer ones: made again


def test_long_texts_are_not_kept_and_clear_forgets() -> None:
    calls: list[str] = []
    words = _maker(calls)
    long = "word " * 10
    for _ in range(3):
        assert words(long) == ("word",) * 10
    assert len(calls) == 3 and words.info().currsize == 0
    words("a b"), words("a b")
    assert words.info().currsize == 1
    words.clear()
    assert words.info().currsize == 0
    calls.clear()
    words("a b")
    assert calls == ["a b"]  # seen once again: not kept yet
    assert words.info().currsize == 0


def test_known_makes_a_value_only_for_a_text_seen_before() -> None:
    calls: list[str] = []
    words = _maker(calls)
    assert words.known("a b") is None and calls == []  # noted only
    assert words.known("a b") == ("a", "b") and calls == ["a b"]  # made and kept
    assert words.known("a b") == ("a", "b") and calls == ["a b"]
    assert words.known("word " * 10) is None and words.known("word " * 10) is None  # too long
    assert calls == ["a b"]
