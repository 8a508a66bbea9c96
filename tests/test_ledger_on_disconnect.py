"""A client that leaves while its answer is being stored still gets its ledger row."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import openai
import pytest

from skinflint.config import settings_from_dict
from skinflint.server.run import BackgroundServer
from tests.conftest import base_config, ledger_rows
from tests.fake_upstream import FakeUpstream
from tests.pg import free_port
from tests.redis_server import spawn_redis


def _wait_for_redis(port: int) -> None:
    import redis

    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_client_leaving_during_the_cache_write_keeps_its_ledger_row(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """The upstream answers, then the cache write hangs (Redis stopped): the client gives up
    and the gateway cancels the request in the middle of the write. The provider was paid, so
    the row must be written all the same."""
    port = free_port()
    proc = spawn_redis(port)
    _wait_for_redis(port)
    config = base_config(fake, tmp_path / "skinflint.db")
    config["storage"]["redis_url"] = f"redis://127.0.0.1:{port}/0"
    server = BackgroundServer(settings_from_dict(config, env={})).__enter__()
    try:
        def stop_redis_once_upstream_is_reached() -> None:
            deadline = time.monotonic() + 5
            while not fake.requests and time.monotonic() < deadline:
                time.sleep(0.005)
            proc.send_signal(signal.SIGSTOP)  # the answer's cache write will hang

        stopper = threading.Thread(target=stop_redis_once_upstream_is_reached)
        stopper.start()
        with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0,
                           timeout=1.0) as c, pytest.raises(openai.APITimeoutError):
            c.chat.completions.create(
                model="gpt-4o-mini", temperature=0,
                messages=[{"role": "user", "content": "paid for [[fault:delay=0.5]]"}])
        stopper.join()
        rows = ledger_rows(tmp_path / "skinflint.db", expect=1, wait=5)
        assert len(rows) == 1 and rows[0]["model"] == "gpt-4o-mini"
        assert rows[0]["input_tokens"] > 0 and rows[0]["cost_usd"] > 0
    finally:
        proc.send_signal(signal.SIGCONT)
        server.__exit__(None, None, None)
        proc.terminate()
        proc.wait(timeout=10)
