"""The command line: serve (with SIGTERM flush), report, prices, cache (the demo: test_demo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from skinflint.cli import main
from tests.conftest import base_config, ledger_rows
from tests.fake_upstream import FakeUpstream
from tests.pg import free_port


def _write_config(fake: FakeUpstream, tmp_path: Path, **extra: object) -> Path:
    config = base_config(fake, tmp_path / "skinflint.db", **extra)
    config["storage"]["ledger_flush_interval"] = 30  # only a shutdown flush can write rows
    path = tmp_path / "skinflint.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    with httpx.Client(timeout=0.5) as http:  # one client: each new one loads the CA bundle
        while time.monotonic() < deadline:
            assert proc.poll() is None, "gateway exited"
            try:
                if http.get(url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
    raise AssertionError("gateway did not become healthy")


def test_serve_flushes_ledger_on_sigterm(fake: FakeUpstream, tmp_path: Path) -> None:
    config = _write_config(fake, tmp_path)
    port = free_port()
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "skinflint.cli",
            "--config",
            str(config),
            "serve",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
    ) as proc:
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", proc)
            with openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0
            ) as c:
                for i in range(5):
                    c.chat.completions.create(
                        model="gpt-4o-mini",
                        temperature=0,
                        messages=[{"role": "user", "content": f"q{i}"}],
                    )
            assert ledger_rows(tmp_path / "skinflint.db", wait=0) == []  # nothing flushed yet
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) in (0, -signal.SIGTERM)  # uvicorn re-raises it
        finally:
            proc.kill()
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
    rows = ledger_rows(tmp_path / "skinflint.db")
    assert len(rows) == 5 and all(r["status"] == 200 for r in rows)
    assert "sk-upstream-secret-123" not in log


def test_zero_config_binds_loopback_and_starts_offline(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-x"}
    env.pop("SKINFLINT_CONFIG", None)
    with subprocess.Popen(
        [sys.executable, "-m", "skinflint.cli", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", proc)
            listening = Path("/proc/net/tcp").read_text()
            assert f"0100007F:{port:04X}" in listening  # 127.0.0.1, not 0.0.0.0
            # an unreachable upstream is a clear 502, not a crash
            resp = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
            )
            assert resp.status_code == 502
            assert resp.json()["error"]["type"] == "connection_error"
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    assert (tmp_path / "skinflint.db").exists()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_report_groups_and_json(
    gateway: object, client: openai.OpenAI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for feature in ("search", "search", "summary"):
        client.chat.completions.create(
            model="gpt-4o-mini",
            temperature=0,
            extra_headers={"x-skinflint-feature": feature},
            messages=[{"role": "user", "content": f"about {feature}"}],
        )
    db = str(tmp_path / "skinflint.db")
    ledger_rows(tmp_path / "skinflint.db", expect=3)
    code, out, _ = _run(capsys, "report", "--db", db, "--by", "feature", "--json")
    assert code == 0
    data = json.loads(out)
    groups = {g["key"]: g for g in data["groups"]}
    assert groups["search"]["requests"] == 2 and groups["summary"]["requests"] == 1
    assert groups["search"]["cache_hit_rate"] == 0.5
    assert data["total"]["cost_usd"] == pytest.approx(
        sum(r["cost_usd"] for r in ledger_rows(tmp_path / "skinflint.db"))
    )
    code, out, _ = _run(capsys, "report", "--db", db, "--by", "model", "--since", "1h")
    assert code == 0 and "gpt-4o-mini" in out and "Spend by model" in out


@pytest.mark.parametrize("argv", [["serve", "--port", "abc"], ["bogus"], ["cache"],
                                  ["report", "--by", "colour"]])
def test_bad_arguments_are_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith("skinflint") and err.count("\n") == 1 and "usage:" not in err


def test_report_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _run(capsys, "report", "--db", str(tmp_path / "none.db"))
    assert code == 2 and err.count("\n") == 1 and "no ledger" in err
    code, _, err = _run(capsys, "report", "--db", str(tmp_path / "none.db"), "--since", "soon")
    assert code == 2 and "--since" in err


def test_prices(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = _run(capsys, "prices", "gpt-4o", "--json")
    assert code == 0
    row = json.loads(out)[0]
    assert row["input_per_mtok"] == 2.5 and row["source"].startswith("genai-prices")
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "providers": {"local": {"base_url": "http://127.0.0.1:1/v1"}},
                "models": {
                    "qwen3-8b": {"provider": "local", "price": {"input": 0.01, "output": 0.01}}
                },
            }
        )
    )
    code, out, _ = _run(capsys, "--config", str(config), "prices", "qwen3-8b")
    assert code == 0 and "config" in out and "0.01" in out
    code, _, err = _run(capsys, "prices", "no-such-model-xyz")
    assert code == 2 and "no price known" in err


def test_prices_of_an_embedding_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "prices", "text-embedding-3-small", "--json")
    assert code == 0
    row = json.loads(out)[0]
    assert row["input_per_mtok"] == 0.02 and row["output_per_mtok"] is None  # not billed
    assert row["source"] == "genai-prices (openai/text-embedding-3-small)"
    piped = subprocess.run(
        [sys.executable, "-m", "skinflint.cli", "prices", "text-embedding-3-small"],
        env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
        capture_output=True, text=True, timeout=60,
    )
    assert piped.returncode == 0 and "0.02" in piped.stdout
    assert "text-embedding-3-small" in piped.stdout and "…" not in piped.stdout  # never cut
    assert max(map(len, piped.stdout.splitlines())) <= 80


def test_prices_show_the_rates_of_a_calls_parts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "prices", "gpt-audio", "--json")
    row = json.loads(out)[0]
    assert code == 0 and (row["input_audio_per_mtok"], row["output_audio_per_mtok"]) == (32, 64)
    assert row["cache_write_per_mtok"] is None and row["reasoning_per_mtok"] is None
    code, out, _ = _run(capsys, "prices", "claude-3-5-sonnet-latest")
    assert code == 0 and "cache write 3.75" in " ".join(out.split())


def test_prices_show_the_batch_price_and_where_it_comes_from(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = _run(capsys, "prices", "claude-haiku-4-5", "--json")
    row = json.loads(out)[0]
    assert code == 0 and (row["batch_input_per_mtok"], row["batch_output_per_mtok"]) == (0.5, 2.5)
    assert row["batch_price"] == "catalog" and row["batch_source"].endswith("batch price)")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "providers": {"ds": {"base_url": "http://127.0.0.1:1/v1", "batch_discount": 0.4}},
        "models": {"chat": {"provider": "ds", "model": "deepseek-chat"}}}))
    code, out, _ = _run(capsys, "--config", str(config), "prices", "chat", "--json")
    row = json.loads(out)[0]
    assert code == 0 and row["batch_price"] == "discount"
    assert row["batch_input_per_mtok"] == pytest.approx(0.4 * row["input_per_mtok"])
    assert row["batch_source"].endswith("x 0.4 (providers.ds.batch_discount)")
    code, out, _ = _run(capsys, "--config", str(config), "prices", "chat")
    assert code == 0 and "providers.ds.batch_discount" in "".join(out.split())


def test_bad_config_names_the_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"providers": {"p": {"kind": "openai-compatible", "base_url": "x", "timeout": -1}}}
        )
    )
    code, _, err = _run(capsys, "--config", str(config), "prices")
    assert code == 2 and "providers.p.timeout" in err
    config.write_text("providers: {p: {base_url: '${NOT_SET_ANYWHERE_VAR}'}}")
    code, _, err = _run(capsys, "--config", str(config), "prices")
    assert code == 2 and "NOT_SET_ANYWHERE_VAR" in err
    config.write_text("storage: {redis_url: 'http://cache:6379'}")
    code, _, err = _run(capsys, "--config", str(config), "prices")
    assert code == 2 and "storage.redis_url" in err and "cache:6379" not in err


def test_cache_stats_and_offline_invalidate(
    gateway: object, client: openai.OpenAI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for tag in ("user:1", "user:2"):
        for _ in range(2):
            client.chat.completions.create(
                model="gpt-4o-mini",
                temperature=0,
                extra_headers={"x-skinflint-tags": tag},
                messages=[{"role": "user", "content": f"for {tag}"}],
            )
    db = str(tmp_path / "skinflint.db")
    ledger_rows(tmp_path / "skinflint.db", expect=4)
    time.sleep(0.3)  # the cache writer batches every 0.1 s
    code, out, _ = _run(capsys, "cache", "stats", "--db", db, "--json")
    stats = json.loads(out)
    assert code == 0 and stats["entries"] == 2 and stats["hits"] == 2 and stats["hit_rate"] == 0.5
    code, out, _ = _run(
        capsys,
        "cache",
        "invalidate",
        "--tag",
        "user:1",
        "--db",
        db,
        "--url",
        "http://127.0.0.1:9",
        "--json",
    )
    assert code == 0 and json.loads(out)["invalidated"] == 1
    _, out, _ = _run(capsys, "cache", "stats", "--db", db, "--json")
    assert json.loads(out)["entries"] == 1


def test_cache_invalidate_tells_a_running_gateway(
    gateway: object, client: openai.OpenAI, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    kw = {
        "model": "gpt-4o-mini",
        "temperature": 0,
        "messages": [{"role": "user", "content": "tagged"}],
    }
    client.chat.completions.create(**kw, extra_headers={"x-skinflint-tags": "docs:v1"})  # type: ignore[call-overload]
    code, out, _ = _run(
        capsys,
        "cache",
        "invalidate",
        "--tag",
        "docs:v1",
        "--url",
        gateway.root_url,
        "--db",
        str(tmp_path / "skinflint.db"),
    )  # type: ignore[attr-defined]
    assert code == 0 and "gateway at" in out
    raw = client.chat.completions.with_raw_response.create(**kw)  # type: ignore[call-overload]
    assert raw.headers["x-skinflint-cache"] == "miss"
