"""Upstream faults, one matrix: each fault the fake upstream can inject, through the real
gateway, with the official SDK (raw HTTP for the server-sent events themselves).

For every fault: how often the upstream was called (retries) and whether the next target was
tried; what the client saw (an OpenAI-shaped error, or a stream ending with an error event);
a ledger row for every call that may have cost money; nothing cached; and the budget's
reservation settled, its spending matching the ledger.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from skinflint.cli import main
from skinflint.config import settings_from_dict
from skinflint.models import RETRIED_ATTEMPT
from skinflint.server.run import BackgroundServer
from tests.conftest import PromptServer, base_config, ledger_rows
from tests.fake_upstream import FakeUpstream
from tests.pg import free_port

CHAT, MESSAGES = "/v1/chat/completions", "/v1/messages"
PROMPT = "tell me about the weather in the mountains today"


@dataclass
class Gateway:
    server: BackgroundServer
    client: openai.OpenAI
    db: Path

    def budget(self) -> dict[str, Any]:
        """The one budget's row, once no request holds a reservation (accounting may finish
        just after the client has its answer)."""
        deadline = time.monotonic() + 3
        while True:
            data = httpx.get(self.server.root_url + "/api/budgets").json()["data"]
            (row,) = data
            if not any(row["reserved"].values()) or time.monotonic() > deadline:
                return row  # type: ignore[no-any-return]
            time.sleep(0.02)


@pytest.fixture
def gw(fake: FakeUpstream, tmp_path: Path) -> Iterator[Gateway]:
    db = tmp_path / "skinflint.db"
    config = base_config(fake, db, fake_opts={"timeout": 0.5, "max_retries": 2},
                         budgets=[{"name": "all", "action": "block",
                                   "limit": {"usd": 1000, "requests": 10**6,
                                             "tokens": 10**9}}])
    config["providers"]["dead"] = {"base_url": f"http://127.0.0.1:{free_port()}/v1",
                                   "max_retries": 2, "backoff_base": 0.01}
    config["models"]["ghost"] = {"provider": "dead", "model": "gpt-4o-mini",
                                 "fallbacks": ["backup"]}
    config["models"]["ghost-only"] = {"provider": "dead", "model": "gpt-4o-mini"}
    config["routes"] = {"smart": {"default_task": "chat", "tasks": {"chat": {"cascade": [
        {"model": "gpt-4o-mini", "gate": {"format": "choice"}}, {"model": "gpt-4o"}]}}}}
    with BackgroundServer(settings_from_dict(config, env={}),
                          server_class=PromptServer) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0,
                           timeout=10) as client:
            yield Gateway(server, client, db)


@dataclass(frozen=True)
class Fault:
    """A fault injected into every chat call, and what the gateway makes of it."""

    spec: str  # a fail_next marker body; "" for the closed port
    status: int  # what the client sees once retries run out
    code: str | None  # the error's code
    costly: bool  # whether a failed call may have cost money (and so gets a row)
    model: str = "gpt-4o-mini"
    fallback: str = "primary"

    def inject(self, fake: FakeUpstream, times: int) -> None:
        if self.spec:
            fake.fail_next(self.spec, times=times)

    @property
    def calls_made(self) -> bool:
        return bool(self.spec)


FAULTS = {
    "refused": Fault("", 502, None, False, model="ghost-only", fallback="ghost"),
    "timeout": Fault("delay=1.5", 504, None, True),
    "429-retry-after": Fault("status=429,retry_after=0.2", 429, "rate_limit_exceeded", False),
    "429": Fault("status=429", 429, "rate_limit_exceeded", False),
    "500": Fault("status=500", 500, None, False),
    "502": Fault("status=502", 502, None, False),
    "503": Fault("status=503", 503, None, False),
    "reset-mid-body": Fault("cut=40", 502, "upstream_cut", True),
    "malformed-200": Fault("malformed", 502, "upstream_bad_json", True),
}


@dataclass(frozen=True)
class Answer:
    status: int
    headers: httpx.Headers
    text: str  # the answer's text, or the error's body


def _ask(gw: Gateway, model: str) -> Answer:
    try:
        raw = gw.client.chat.completions.with_raw_response.create(
            model=model, temperature=0, messages=[{"role": "user", "content": PROMPT}])
    except openai.APIStatusError as exc:
        return Answer(exc.status_code, exc.response.headers, exc.response.text)
    return Answer(raw.status_code, raw.headers, raw.parse().choices[0].message.content or "")


def _retried(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["strategy"] == RETRIED_ATTEMPT]


def _assert_budget_matches_ledger(gw: Gateway, rows: list[dict[str, Any]],
                                  requests: int) -> None:
    budget = gw.budget()
    assert budget["reserved"] == {"usd": 0, "requests": 0, "tokens": 0}
    assert budget["spent"]["requests"] == requests  # client requests, not calls
    assert budget["spent"]["usd"] == pytest.approx(sum(r["cost_usd"] or 0 for r in rows))
    assert budget["spent"]["tokens"] == sum(r["input_tokens"] + r["output_tokens"] for r in rows)


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_retries_run_out(gw: Gateway, fake: FakeUpstream, fault: Fault) -> None:
    """Three calls (one and two retries), then an OpenAI-shaped error; the calls that may
    have cost money and were retried get a row each; nothing is cached."""
    fault.inject(fake, times=3)
    failed = _ask(gw, fault.model)
    assert failed.status == fault.status
    error = json.loads(failed.text)["error"]
    assert set(error) >= {"message", "type", "code"} and error["code"] == fault.code
    assert "sk-upstream-secret" not in failed.text
    if fault.spec.startswith("status=429,retry_after"):
        assert failed.headers["retry-after"] == "1"
    elif fault.status == 429:
        assert "retry-after" not in failed.headers
    assert len(fake.calls(CHAT)) == (3 if fault.calls_made else 0)

    rows = ledger_rows(gw.db, expect=3 if fault.costly else 1)
    retried = _retried(rows)
    assert len(retried) == (2 if fault.costly else 0)
    assert all(r["status"] == fault.status and r["cost_usd"] is None for r in retried)
    (own,) = [r for r in rows if r["strategy"] != RETRIED_ATTEMPT]
    assert own["status"] == fault.status
    suffixes = [".1.r1", ".1.r2"][: len(retried)]
    assert [r["request_id"] for r in retried] == [own["request_id"] + s for s in suffixes]
    _assert_budget_matches_ledger(gw, rows, requests=1)

    fake.reset()  # the same request again reaches the upstream: nothing was cached
    again = _ask(gw, fault.model)
    assert again.headers["x-skinflint-cache"] == "miss"
    if fault.calls_made:
        assert again.status == 200 and len(fake.calls(CHAT)) == 1
    else:
        assert again.status == fault.status


ANSWERING = {k: f for k, f in FAULTS.items() if f.calls_made}  # a closed port never answers


@pytest.mark.parametrize("fault", ANSWERING.values(), ids=ANSWERING.keys())
def test_a_retry_succeeds(gw: Gateway, fake: FakeUpstream, fault: Fault) -> None:
    """One failed call, then the answer; a failed call that may have cost money keeps a row."""
    fault.inject(fake, times=1)
    done = _ask(gw, fault.model)
    assert done.status == 200 and done.text == f"echo: {PROMPT}"
    assert len(fake.calls(CHAT)) == 2
    rows = ledger_rows(gw.db, expect=2 if fault.costly else 1)
    assert len(_retried(rows)) == (1 if fault.costly else 0)
    (own,) = [r for r in rows if r["strategy"] != RETRIED_ATTEMPT]
    assert own["status"] == 200 and own["cost_usd"] > 0 and own["strategy"] == ""
    _assert_budget_matches_ledger(gw, rows, requests=1)


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_the_next_target_answers(gw: Gateway, fake: FakeUpstream, fault: Fault) -> None:
    """Once the first target's retries run out, its fallback (another provider) answers; every
    call to the first that may have cost money keeps a row."""
    fault.inject(fake, times=3)
    done = _ask(gw, fault.fallback)
    assert done.status == 200
    assert done.headers["x-skinflint-model"] == "claude-3-5-haiku-latest"
    assert len(fake.calls(CHAT)) == (3 if fault.calls_made else 0)
    assert len(fake.calls(MESSAGES)) == 1
    rows = ledger_rows(gw.db, expect=4 if fault.costly else 1)
    assert len(_retried(rows)) == (3 if fault.costly else 0)
    (own,) = [r for r in rows if r["strategy"] != RETRIED_ATTEMPT]
    assert own["provider"] == "claude" and own["status"] == 200
    _assert_budget_matches_ledger(gw, rows, requests=1)


def _sse(gw: Gateway, content: str) -> list[str]:
    """The data lines of a streamed answer, read with a deadline (a hang fails the test)."""
    body = {"model": "gpt-4o-mini", "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": content}]}
    with httpx.stream("POST", gw.server.base_url + "/chat/completions", json=body,
                      timeout=5) as response:
        assert response.status_code == 200
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_a_stream_cut_before_its_first_chunk_is_retried(gw: Gateway, fake: FakeUpstream) -> None:
    fake.fail_next("cut=0")
    lines = _sse(gw, PROMPT)
    assert lines[-1] == "[DONE]" and len(fake.calls(CHAT)) == 2
    rows = ledger_rows(gw.db, expect=2)
    (retried,) = _retried(rows)
    assert retried["status"] == 502 and retried["error_type"] == "upstream_cut"
    _assert_budget_matches_ledger(gw, rows, requests=1)


def test_a_stream_cut_after_its_first_chunk_ends_with_an_error_event(
    gw: Gateway, fake: FakeUpstream
) -> None:
    """The client has seen output, so no retry: the stream ends with an error event (the SDK
    raises), its partial output is counted and paid for, and nothing is cached."""
    content = f"{PROMPT} [[fault:cut=4]]"
    lines = _sse(gw, content)
    assert lines[-1] != "[DONE]" and '"error"' in lines[-1] and "upstream_cut" in lines[-1]
    assert len(fake.calls(CHAT)) == 1
    (row,) = ledger_rows(gw.db, expect=1)
    assert row["status"] == 502 and row["error_type"] == "upstream_cut"
    assert row["output_tokens"] > 0 and row["cost_usd"] > 0  # the partial answer, counted
    _assert_budget_matches_ledger(gw, [row], requests=1)

    with pytest.raises(openai.APIError):  # the same request again reaches the upstream
        for _ in gw.client.chat.completions.create(
                model="gpt-4o-mini", temperature=0, stream=True,
                messages=[{"role": "user", "content": content}]):
            pass
    assert len(fake.calls(CHAT)) == 2


def test_a_client_leaving_mid_stream_cancels_the_upstream_call(
    gw: Gateway, fake: FakeUpstream
) -> None:
    body = {"model": "gpt-4o-mini", "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": f"{PROMPT} [[fault:chunk_delay=0.3]]"}]}
    with httpx.stream("POST", gw.server.base_url + "/chat/completions", json=body,
                      timeout=5) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    assert fake.wait_for_disconnects(1, timeout=3)
    (row,) = ledger_rows(gw.db, expect=1)
    assert row["status"] == 499 and row["error_type"] == "client_disconnected"
    _assert_budget_matches_ledger(gw, [row], requests=1)
    assert len(fake.calls(CHAT)) == 1


def test_a_client_leaving_before_the_first_chunk_is_recorded_and_releases_its_budget(
    gw: Gateway, fake: FakeUpstream
) -> None:
    """The client gives up while the upstream has not sent a byte yet: the upstream call is
    cancelled, the request has its 499 row, and nothing stays reserved."""
    body = {"model": "gpt-4o-mini", "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": f"{PROMPT} [[fault:delay=0.4]]"}]}
    with pytest.raises(httpx.ReadTimeout):  # the upstream would answer after 0.4 s
        with httpx.stream("POST", gw.server.base_url + "/chat/completions", json=body,
                          timeout=httpx.Timeout(5, read=0.1)) as response:
            response.read()
    assert fake.wait_for_disconnects(1, timeout=3)
    (row,) = ledger_rows(gw.db, expect=1)
    assert row["status"] == 499 and row["error_type"] == "client_disconnected"
    _assert_budget_matches_ledger(gw, [row], requests=1)
    # the same request, asked again, is not left waiting for the abandoned one
    again = gw.client.chat.completions.create(**{**body, "stream": False})
    assert again.choices[0].message.content and len(fake.calls(CHAT)) == 2


def test_retried_calls_are_not_counted_as_requests(
    gw: Gateway, fake: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    """``report`` and ``cache stats`` count client requests; the retried calls are counted
    apart, their cost included."""
    FAULTS["timeout"].inject(fake, times=1)
    assert _ask(gw, "gpt-4o-mini").status == 200
    assert _ask(gw, "gpt-4o-mini").headers["x-skinflint-cache"] == "hit-exact"
    ledger_rows(gw.db, expect=3)
    assert main(["report", "--db", str(gw.db), "--json"]) == 0
    total = json.loads(capsys.readouterr().out)["total"]
    assert (total["requests"], total["retried_attempts"], total["cache_hits"]) == (2, 1, 1)
    assert main(["cache", "stats", "--db", str(gw.db), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["requests"], stats["hit_rate"]) == (2, 0.5)


def test_a_retried_call_within_a_cascade_keeps_its_row(gw: Gateway, fake: FakeUpstream) -> None:
    """The first tier's unreadable answer is retried; the echo is not a choice, so the cascade
    escalates: a row for the retried call, one for the escalated tier, one for the request."""
    fake.fail_next("malformed")
    assert _ask(gw, "smart").status == 200
    assert [c.body["model"] for c in fake.calls(CHAT)] == ["gpt-4o-mini"] * 2 + ["gpt-4o"]
    rows = ledger_rows(gw.db, expect=3)
    own = next(r for r in rows if r["strategy"] == "cascade")
    assert sorted((r["request_id"].removeprefix(own["request_id"]), r["strategy"], r["model"])
                  for r in rows) == [("", "cascade", "gpt-4o"),
                                     (".1", "cascade_escalated", "gpt-4o-mini"),
                                     (".1.r1", RETRIED_ATTEMPT, "gpt-4o-mini")]
    _assert_budget_matches_ledger(gw, rows, requests=1)
