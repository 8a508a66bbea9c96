"""Compression through the real gateway: the provider receives the shrunk prompt, the client
is told which strategies shrank it, the ledger keeps the tokens saved, and the cache keeps the
key of what the client sent."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai

from skinflint.tokens import TokenCounter
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_upstream import FakeUpstream

TEMPLATE = 'Print only a single choice from "A" or "B" or "C" or "D" without explanation.'


def _block(question: str, answer: str = "") -> str:
    text = f"{question}\nA) one\nB) two\nC) three\nD) four\n{TEMPLATE}\nAnswer:"
    return f"{text}\n{answer}" if answer else text


EXAMPLES = [_block("Which planet is closest to the Sun?", "A"),
            _block("What gas do plants absorb for photosynthesis?", "B"),
            _block("Which metal is liquid at room temperature?", "C"),
            _block("How do plants turn sunlight into sugar in photosynthesis?", "D")]
QUESTION = _block("Which gas do plants release during photosynthesis?")
PROMPT = "\n\n".join([*EXAMPLES, QUESTION])


def test_the_provider_gets_the_pruned_prompt_and_the_ledger_the_saving(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    gw = make_gateway(compression={"features": {"quiz": {"few_shot": {"keep": 2}}}})
    messages = [{"role": "user", "content": PROMPT}]
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0, timeout=10) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=messages,  # type: ignore[arg-type]
            temperature=0, extra_headers={"x-skinflint-feature": "quiz"})
        again = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=messages,  # type: ignore[arg-type]
            temperature=0, extra_headers={"x-skinflint-feature": "quiz"})
    sent = fake.requests[-1].body["messages"][0]["content"]
    assert sent == f"{EXAMPLES[1]}\n\n{EXAMPLES[3]}\n\n{QUESTION}"
    assert raw.headers["x-skinflint-route"] == "gpt-4o;compressed=few_shot"
    assert again.headers["x-skinflint-cache"] == "hit-exact"  # keyed by what the client sent
    assert len(fake.requests) == 1
    row = ledger_rows(tmp_path / "skinflint.db", expect=2)[0]
    counter = TokenCounter()
    saved = (counter.count_messages("gpt-4o", messages)
             - counter.count_messages("gpt-4o", [{"role": "user", "content": sent}]))
    assert row["tokens_saved"] == saved > 50
    assert row["route"] == "gpt-4o"
    metrics = httpx.get(gw.root_url + "/metrics").text
    assert f'skinflint_compression_tokens_saved_total{{strategy="few_shot"}} {saved:.1f}' in metrics


def test_another_feature_is_sent_as_it_came(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    gw = make_gateway(compression={"features": {"quiz": {"few_shot": {"keep": 2}}}})
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0, timeout=10) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": PROMPT}], temperature=0)
    assert fake.requests[-1].body["messages"][0]["content"] == PROMPT
    assert raw.headers["x-skinflint-route"] == "gpt-4o"
    assert ledger_rows(tmp_path / "skinflint.db", expect=1)[0]["tokens_saved"] == 0
