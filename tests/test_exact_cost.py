"""Exact cost: every part of a provider's usage reaches the ledger, priced as genai-prices
prices it. Each test sends a request through the gateway to the fake upstream, whose usage
markers report the parts, and compares the ledger row with the catalog's own answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import genai_prices
import openai
import pytest

from tests.conftest import ledger_rows
from tests.fake_upstream import FakeUpstream

#: The ledger's token columns, and the catalog's name for each.
CATALOG_KEYS = {
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cached_tokens": "cache_read_tokens",
    "cache_write_tokens": "cache_write_tokens",
    "input_audio_tokens": "input_audio_tokens",
    "output_audio_tokens": "output_audio_tokens",
    "reasoning_tokens": "output_reasoning_tokens",
}


def catalog_cost(model: str, provider_id: str | None = None, **counts: int) -> float:
    """What genai-prices charges for ``counts`` (ledger column names) on ``model``."""
    usage = genai_prices.Usage(**{CATALOG_KEYS[k]: v for k, v in counts.items() if v})
    found = genai_prices.calc_price(usage, model_ref=model, provider_id=provider_id)
    return float(found.total_price)


def prompt_tokens(*texts: str) -> int:
    """The fake's count for a prompt of one message per text."""
    return sum(len(t.split()) + 3 for t in texts)


def only_row(db: Path) -> dict[str, Any]:
    rows = ledger_rows(db, expect=1)
    assert len(rows) == 1
    return rows[0]


def assert_row(row: dict[str, Any], model: str, provider_id: str | None = None,
               **counts: int) -> None:
    """The row's token columns are ``counts`` (0 for those not given) and its cost is the
    catalog's for them."""
    assert {k: row[k] for k in CATALOG_KEYS} == {k: counts.get(k, 0) for k in CATALOG_KEYS}
    assert row["cost_usd"] == pytest.approx(catalog_cost(model, provider_id, **counts), rel=1e-9)


def say(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_openai_cached_prompt_tokens(client: openai.OpenAI, tmp_path: Path) -> None:
    text = "summarise the attached policy document for me [[cached=5]]"
    done = client.chat.completions.create(model="gpt-4o-mini", messages=say(text))
    assert done.usage is not None
    prompt, completion = prompt_tokens(text), done.usage.completion_tokens
    assert done.usage.prompt_tokens == prompt
    row = only_row(tmp_path / "skinflint.db")
    assert_row(row, "gpt-4o-mini", input_tokens=prompt, output_tokens=completion,
               cached_tokens=5)
    assert row["cost_usd"] < catalog_cost("gpt-4o-mini", input_tokens=prompt,
                                          output_tokens=completion)


def test_anthropic_cache_read(client: openai.OpenAI, tmp_path: Path) -> None:
    text = "what does clause four of the contract say [[cached=6]]"
    done = client.chat.completions.create(model="claude-sonnet", messages=say(text),
                                          max_tokens=100)
    assert done.usage is not None and done.usage.prompt_tokens_details is not None
    prompt = prompt_tokens(text)  # Anthropic leaves cache reads out; OpenAI counts them in
    assert (done.usage.prompt_tokens, done.usage.prompt_tokens_details.cached_tokens) == (prompt, 6)
    assert_row(only_row(tmp_path / "skinflint.db"), "claude-3-5-sonnet-latest",
               input_tokens=prompt, output_tokens=done.usage.completion_tokens, cached_tokens=6)


def test_anthropic_cache_write(client: openai.OpenAI, tmp_path: Path) -> None:
    text = "remember this long system context for later turns [[cache_write=7]]"
    done = client.chat.completions.create(model="claude-sonnet", messages=say(text),
                                          max_tokens=100)
    assert done.usage is not None and done.usage.prompt_tokens == prompt_tokens(text)
    row = only_row(tmp_path / "skinflint.db")
    counts = {"input_tokens": prompt_tokens(text),
              "output_tokens": done.usage.completion_tokens}
    assert_row(row, "claude-3-5-sonnet-latest", **counts, cache_write_tokens=7)
    # A cache write costs more than an input token (3.75 against 3 USD per million).
    assert row["cost_usd"] > catalog_cost("claude-3-5-sonnet-latest", **counts)


def test_anthropic_stream_with_cache_read_and_write(client: openai.OpenAI, tmp_path: Path) -> None:
    text = "stream a reply about the cached handbook [[cached=3]] [[cache_write=4]]"
    chunks = list(client.chat.completions.create(
        model="claude-sonnet", messages=say(text), max_tokens=100, stream=True))
    assert all(c.usage is None for c in chunks)
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert_row(only_row(tmp_path / "skinflint.db"), "claude-3-5-sonnet-latest",
               input_tokens=prompt_tokens(text), output_tokens=len(answer.split()),
               cached_tokens=3, cache_write_tokens=4)


def test_reasoning_tokens(client: openai.OpenAI, tmp_path: Path) -> None:
    text = "prove that the square root of two is irrational [[reasoning=40]]"
    done = client.chat.completions.create(model="o3-mini", messages=say(text))
    assert done.usage is not None and done.usage.completion_tokens_details is not None
    assert done.usage.completion_tokens_details.reasoning_tokens == 40
    answer = done.choices[0].message.content or ""
    assert done.usage.completion_tokens == len(answer.split()) + 40  # reasoning is billed output
    assert_row(only_row(tmp_path / "skinflint.db"), "o3-mini", input_tokens=prompt_tokens(text),
               output_tokens=done.usage.completion_tokens, reasoning_tokens=40)


def test_audio_tokens(client: openai.OpenAI, tmp_path: Path) -> None:
    # gpt-audio: the catalog prices audio at 32 (in) and 64 (out) USD per million, text at 2.5/10
    text = "transcribe and answer the recorded question [[audio_in=5]] [[audio_out=12]]"
    done = client.chat.completions.create(model="gpt-audio", messages=say(text))
    assert done.usage is not None
    row = only_row(tmp_path / "skinflint.db")
    counts = {"input_tokens": prompt_tokens(text), "output_tokens": done.usage.completion_tokens}
    assert_row(row, "gpt-audio", **counts, input_audio_tokens=5, output_audio_tokens=12)
    assert row["cost_usd"] > catalog_cost("gpt-audio", **counts)  # not priced as text


def test_embeddings(client: openai.OpenAI, tmp_path: Path) -> None:
    done = client.embeddings.create(model="text-embedding-3-small",
                                    input=["first passage to embed", "and a second one"])
    assert done.usage.prompt_tokens > 0
    # The catalog lists this model under OpenAI without matching its name to the provider.
    assert_row(only_row(tmp_path / "skinflint.db"), "text-embedding-3-small", "openai",
               input_tokens=done.usage.prompt_tokens)


@pytest.mark.parametrize("client_wants_usage", [False, True])
def test_stream_is_accounted_from_the_final_usage_chunk(
    client: openai.OpenAI, fake: FakeUpstream, tmp_path: Path, client_wants_usage: bool
) -> None:
    text = "stream a careful answer [[cached=4]] [[reasoning=9]]"
    options: Any = {"stream_options": {"include_usage": True}} if client_wants_usage else {}
    chunks = list(client.chat.completions.create(
        model="o3-mini", messages=say(text), stream=True, **options))
    sent = fake.requests[-1].body
    assert sent is not None and sent["stream_options"] == {"include_usage": True}
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    counts = {"input_tokens": prompt_tokens(text), "output_tokens": len(answer.split()) + 9,
              "cached_tokens": 4, "reasoning_tokens": 9}
    usage = [c.usage for c in chunks if c.usage is not None]
    if client_wants_usage:
        assert len(usage) == 1 and chunks[-1].usage is usage[0] and not chunks[-1].choices
        assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (
            counts["input_tokens"], counts["output_tokens"])
    else:
        assert usage == [] and all(c.choices for c in chunks)
    assert_row(only_row(tmp_path / "skinflint.db"), "o3-mini", **counts)
