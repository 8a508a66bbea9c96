"""No key is ever written down: the upstream keys, the gateway keys and the admin key appear
nowhere in the gateway's logs, its ledger and cache database, its ledger spill file, or any
answer it gives, even when the upstream puts a key in its error text and the ledger is locked
at shutdown so that its records are spilled to disk (which also shows that a store failing to
close on a locked file never keeps the ledger from spilling)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.fake_upstream import FakeUpstream
from tests.pg import free_port
from tests.processes import stop
from tests.storage.test_ledger_durability import locked, spill_files

UPSTREAM_KEY = "sk-upstream-Zq7Xv3Lk9Pw2Rt5Y"
ANTHROPIC_KEY = "sk-ant-api03-Hn4Bv8Mc1Xs6Qd0W"
GATEWAY_KEY = "sk-gateway-Jf2Kd9Ls4Ma7Pq1T"
ADMIN_KEY = "admin-Wv5Nc3Bx8Zr6Ty0U"
WRONG_KEY = "sk-stranger-Ee3Rr5Tt7Yy9Uu1I"  # a client's key the gateway refuses
SECRETS = (UPSTREAM_KEY, ANTHROPIC_KEY, GATEWAY_KEY, ADMIN_KEY, WRONG_KEY)
# A vendor that quotes the key it was sent (some do, masked or not).
QUOTING = f"Incorrect API key provided: {UPSTREAM_KEY}. You can find your key at"


def _config(fake: FakeUpstream, db: Path) -> dict[str, object]:
    return {
        "providers": {
            "fake": {"kind": "openai-compatible", "base_url": fake.base_url,
                     "api_key": "${UPSTREAM_KEY}", "max_retries": 0, "timeout": 5},
            "claude": {"kind": "anthropic", "base_url": fake.root_url,
                       "api_key": "${ANTHROPIC_KEY}", "max_retries": 0, "timeout": 5},
        },
        "models": {"claude-sonnet": {"provider": "claude", "model": "claude-3-5-sonnet-latest"}},
        "default_provider": "fake",
        "keys": [{"tenant": "acme", "key": "${GATEWAY_KEY}"}],
        "admin_key": "${ADMIN_KEY}",
        "storage": {"sqlite_path": str(db), "ledger_flush_interval": 0.05},
    }


@pytest.fixture
def served(fake: FakeUpstream, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``skinflint serve`` as a user runs it, keys given through the environment, its logs
    (stdout and stderr) in ``tmp_path/serve.log``."""
    config = tmp_path / "skinflint.yaml"
    config.write_text(yaml.safe_dump(_config(fake, tmp_path / "skinflint.db")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKINFLINT_")}
    env.update(UPSTREAM_KEY=UPSTREAM_KEY, ANTHROPIC_KEY=ANTHROPIC_KEY, GATEWAY_KEY=GATEWAY_KEY,
               ADMIN_KEY=ADMIN_KEY)
    port = free_port()
    with (tmp_path / "serve.log").open("wb") as log, subprocess.Popen(
        [sys.executable, "-m", "skinflint.cli", "serve", "--config", str(config),
         "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    ) as proc:
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(base, proc)
            yield proc, base
        finally:
            stop(proc)


def _wait_ready(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    with httpx.Client(timeout=1) as http:  # one client: each new one loads the CA bundle
        while time.monotonic() < deadline:
            assert proc.poll() is None, "serve exited"
            try:
                http.get(base + "/health")
                return
            except httpx.TransportError:
                time.sleep(0.1)
    raise AssertionError("serve did not start")


def _traffic(base: str, fake: FakeUpstream) -> list[bytes]:
    """Answers of every kind: served, cached, streamed, refused, and upstream errors that quote
    the upstream key. Returns every answer's headers and body as bytes."""
    seen: list[bytes] = []
    hooks = {"response": [lambda r: seen.append(_dump(r.read(), r.headers))]}
    with httpx.Client(base_url=base, timeout=10, event_hooks=hooks) as http:
        sdk = openai.OpenAI(base_url=base + "/v1", api_key=GATEWAY_KEY, max_retries=0,
                            http_client=http)
        msgs = [{"role": "user", "content": "hello"}]
        for _ in range(2):  # the second is a cache hit
            sdk.chat.completions.create(model="gpt-4o-mini", messages=msgs, temperature=0)
        stream = sdk.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True)
        seen.extend(chunk.model_dump_json().encode() for chunk in stream)
        sdk.chat.completions.create(model="claude-sonnet", messages=msgs)
        sdk.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        for status in (401, 400, 500):  # the vendor quotes our key back
            fake.fail_next("", status=status, message=QUOTING)
            with pytest.raises(openai.APIStatusError):
                sdk.chat.completions.create(model="gpt-4o-mini", messages=msgs)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key=WRONG_KEY, max_retries=0,
                          http_client=http).chat.completions.create(model="gpt-4o",
                                                                    messages=msgs)
        for path, key in (("/metrics", ADMIN_KEY), ("/api/budgets", ADMIN_KEY),
                          ("/api/budgets", WRONG_KEY), ("/api/budgets", GATEWAY_KEY),
                          ("/v1/models", GATEWAY_KEY)):
            http.get(path, headers={"authorization": f"Bearer {key}"})
    return seen


def _dump(body: bytes, headers: httpx.Headers) -> bytes:
    return b"\n".join([*(f"{k}: {v}".encode() for k, v in headers.multi_items()), body])


def _leaks(blob: bytes) -> list[str]:
    """The secrets (or a 12-character tail of one, as a masked key shows) found in ``blob``."""
    return [s for s in SECRETS if s.encode() in blob or s[-12:].encode() in blob]


def test_no_key_in_logs_ledger_spill_or_answers(
    served: tuple[subprocess.Popen[bytes], str], fake: FakeUpstream, tmp_path: Path,
) -> None:
    proc, base = served
    answers = _traffic(base, fake)
    assert any(b"chat.completion" in a for a in answers)  # the traffic was served
    assert any(b'"error"' in a for a in answers)  # and refused
    db = tmp_path / "skinflint.db"
    with locked(db):  # the last records cannot be written: shutdown spills them
        httpx.post(base + "/v1/chat/completions", timeout=10,
                   headers={"authorization": f"Bearer {GATEWAY_KEY}"},
                   json={"model": "gpt-4o-mini",
                         "messages": [{"role": "user", "content": "spilled"}]})
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    spilled = spill_files(tmp_path)
    assert spilled, (tmp_path / "serve.log").read_text()
    sources = {
        "answers": b"\n".join(answers),
        "log": (tmp_path / "serve.log").read_bytes(),
        **{p.name: p.read_bytes() for p in spilled},
        **{p.name: p.read_bytes() for p in tmp_path.glob("skinflint.db*")},
    }
    assert b"request_id" in b"".join(p.read_bytes() for p in spilled)  # the last request
    assert fake.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    found = {name: _leaks(blob) for name, blob in sources.items() if _leaks(blob)}
    assert found == {}
