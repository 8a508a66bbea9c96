"""Deferred requests: 10,000 accepted through the real gateway, then a restart in the middle.

One run, on loopback only:

1. starts the test suite's fake upstream (``tests/fake_upstream.py``, its batch API held so
   that batches stay in progress) in this process and ``skinflint serve`` as a child process
   with a fresh SQLite file and ``batching: {window_seconds: 2, poll_seconds: 0.5}``;
2. sends N (10,000) chat requests with ``x-skinflint-priority: batch`` over HTTP (aiohttp,
   keep-alive, concurrency C), and measures how many are accepted (202) per second and the
   gateway's CPU time per request (utime + stime of its process from ``/proc``);
3. waits until every job has been sent in a provider batch (still held), stops the gateway
   (SIGTERM), starts a new one on the same file, releases the fake's batches, and waits until
   every job is ``completed`` through ``GET /v1/skinflint/jobs/{id}``;
4. checks that the fake received each line once and that the ledger holds exactly one row per
   job, strategy ``batch``, at the batch price; appends the figures to
   ``bench/results/deferred.jsonl``.

    python bench/deferred.py                 # 10,000 requests, concurrency 50
    python bench/deferred.py -n 2000 -c 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results" / "deferred.jsonl"
sys.path.insert(0, str(ROOT))

from tests.fake_upstream import FakeUpstream  # noqa: E402  (after the path is set)

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def write_config(work: Path, fake: FakeUpstream) -> Path:
    config = {
        "providers": {"fake": {"kind": "openai-compatible", "base_url": fake.base_url,
                               "api_key": "sk-bench", "timeout": 60}},
        "default_provider": "fake",
        "models": {"gpt-4o-mini": {"provider": "fake"}},
        "storage": {"sqlite_path": str(work / "skinflint.db")},
        "batching": {"window_seconds": 2, "poll_seconds": 0.5},
        "alerts": [],
    }
    path = work / "config.json"  # JSON is YAML
    path.write_text(json.dumps(config))
    return path


class Gateway:
    def __init__(self, config: Path, work: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "skinflint.cli", "serve", "--config", str(config),
             "--port", str(self.port)], cwd=work, stdout=subprocess.DEVNULL,
            stderr=open(work / "gateway.log", "ab"))  # noqa: SIM115  (kept open by the child)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the gateway did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


async def accept(url: str, n: int, concurrency: int) -> tuple[list[str], list[str], float]:
    """Send ``n`` deferred requests; (job ids, request ids, seconds)."""
    jobs: list[str] = [""] * n
    requests: list[str] = [""] * n
    counter = iter(range(n))
    headers = {"x-skinflint-priority": "batch", "content-type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in counter:
            body = {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [
                {"role": "user", "content": f"classify ticket {i}: my invoice is wrong"}]}
            async with session.post(f"{url}/v1/chat/completions", json=body,
                                    headers=headers) as resp:
                found = await resp.json()
                if resp.status != 202:
                    raise RuntimeError(f"request {i}: HTTP {resp.status} {found}")
                jobs[i], requests[i] = found["id"], found["request_id"]

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return jobs, requests, time.perf_counter() - started


async def statuses(url: str, jobs: list[str], concurrency: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    pending = iter(jobs)

    async def worker(session: aiohttp.ClientSession) -> None:
        for job in pending:
            async with session.get(f"{url}/v1/skinflint/jobs/{job}") as resp:
                status = (await resp.json())["status"] if resp.status == 200 else "missing"
                counts[status] = counts.get(status, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return counts


def job_states(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
    finally:
        conn.close()


def ledger(db: Path) -> dict[str, Any]:
    conn = sqlite3.connect(db)
    try:
        rows, distinct, batch, cost, baseline = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT request_id), SUM(strategy = 'batch'),"
            " SUM(cost_usd), SUM(baseline_cost_usd) FROM ledger").fetchone()
    finally:
        conn.close()
    return {"rows": rows, "distinct_request_ids": distinct, "batch_rows": batch,
            "cost_usd": cost, "baseline_cost_usd": baseline}


def wait_for(check: Any, what: str, timeout: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - started


def run(n: int, concurrency: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="skinflint-deferred-"))
    db = work / "skinflint.db"
    with FakeUpstream() as fake:
        fake.batches.hold()
        config = write_config(work, fake)
        first = Gateway(config, work)
        cpu0, client0 = cpu_seconds(first.proc.pid), resource.getrusage(resource.RUSAGE_SELF)
        jobs, requests, seconds = asyncio.run(accept(first.url, n, concurrency))
        cpu1, client1 = cpu_seconds(first.proc.pid), resource.getrusage(resource.RUSAGE_SELF)
        sent_s = wait_for(lambda: fake.batches.submitted >= n, "every job sent", 120)
        first.stop()
        before_restart = job_states(db)
        second = Gateway(config, work)
        fake.batches.release()
        done_s = wait_for(lambda: job_states(db).get("completed", 0) >= n, "every job done",
                          300)
        seen = asyncio.run(statuses(second.url, jobs, concurrency))
        time.sleep(1.0)  # let the ledger's writer catch up
        second.stop()
        figures = ledger(db)
        submitted = fake.batches.submitted
        provider_batches = len(fake.batches.batch_ids())
    client_cpu = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
    ok = (seen.get("completed") == n and submitted == n and figures["rows"] == n
          and figures["batch_rows"] == n and figures["distinct_request_ids"] == n
          and sorted(set(requests)) == sorted(requests))
    return {
        "benchmark": "deferred",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                     capture_output=True).stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "loadavg_at_end": list(os.getloadavg())},
        "settings": {"requests": n, "concurrency": concurrency, "client": "aiohttp keep-alive",
                     "batching": {"window_seconds": 2, "poll_seconds": 0.5},
                     "storage": "SQLite (WAL), one gateway process"},
        "accepted": n, "accept_seconds": round(seconds, 3),
        "accepted_per_s": round(n / seconds, 1),
        "gateway_cpu_ms_per_request": round((cpu1 - cpu0) * 1000 / n, 4),
        "gateway_cpu_pct_of_one_core": round((cpu1 - cpu0) / seconds * 100, 1),
        "client_cpu_ms_per_request": round(client_cpu * 1000 / n, 4),
        "all_sent_after_s": round(sent_s, 2),
        "job_states_before_restart": before_restart,
        "completed_after_restart_s": round(done_s, 2),
        "statuses_after_restart": seen,
        "lines_the_upstream_received": submitted,
        "provider_batches": provider_batches,
        "ledger": figures,
        "batch_saving_pct": round(100 * (1 - figures["cost_usd"] / figures["baseline_cost_usd"]),
                                  1) if figures["baseline_cost_usd"] else None,
        "target_accepted_per_s": 1000, "met": ok and n / seconds >= 1000,
        "survived_restart": ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="deferred requests")
    parser.add_argument("-c", type=int, default=50, help="concurrency")
    args = parser.parse_args()
    result = run(args.n, args.c)
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as out:
        out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
