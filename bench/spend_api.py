"""``GET /api/spend`` and ``GET /api/requests`` on a big SQLite ledger.

Writes ``--rows`` synthetic ledger rows (default 1M) spread over 30 days through the ledger's
own write path (its transaction and insert: rows and rollups, in batches of 10,000), with
realistic cardinalities: 20 features, 8 models, 5,000 users (a few heavy, a long tail), 3
tenants, every strategy, and cascade attempts. Then starts the real gateway on the file
(``skinflint serve``) and times each ``by`` with since=7d and 30d, and the newest rows, over
HTTP: median and max of ``--calls`` calls after one warm-up. The target is 300 ms.
Last, the time a ledger made before rollups takes to build them once, at start.

    python bench/spend_api.py [--rows 1000000] [--calls 7] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from skinflint.models import CASCADE_ATTEMPT, LedgerRecord
from skinflint.storage.ledger import SQLiteLedger
from skinflint.storage.rollup import DIMENSIONS

TARGET_MS = 300.0
STRATEGIES = ["", "", "exact_cache", "semantic_cache", "route", "route", "cascade"]


def synthetic_rows(
    n: int, *, days: int = 30, seed: int = 1, now: float | None = None
) -> Iterator[LedgerRecord]:
    """``n`` rows, oldest first, over the ``days`` before ``now``; about one in 20 is a
    cascade attempt."""
    rnd = random.Random(seed)
    end = time.time() if now is None else now
    features = [f"feature-{i:02d}" for i in range(20)]
    models = ["gpt-4o", "gpt-4o-mini", "o3-mini", "claude-3-5-sonnet", "claude-3-5-haiku",
              "gemini-1.5-flash", "llama-3.1-70b", "qwen3-8b"]
    users = [f"user-{i:04d}" for i in range(5000)]
    user_weights = [1 / (i + 1) ** 0.7 for i in range(len(users))]
    tenants = ["default", "acme", "globex"]
    times = sorted(rnd.uniform(end - days * 86400, end) for _ in range(n))
    picked_users = rnd.choices(users, user_weights, k=n)
    for i, ts in enumerate(times):
        attempt = rnd.random() < 0.05
        strategy = CASCADE_ATTEMPT if attempt else rnd.choice(STRATEGIES)
        hit = strategy in ("exact_cache", "semantic_cache")
        cost = 0.0 if hit else rnd.uniform(1e-5, 5e-3)
        baseline = 0.0 if attempt else rnd.uniform(1e-4, 8e-3)
        yield LedgerRecord(
            f"req-{i:08d}", ts, request_hash=f"{rnd.getrandbits(96):024x}",
            tenant=tenants[i % 3], feature=rnd.choice(features), user=picked_users[i],
            requested_model="auto", model=rnd.choice(models), provider="openai",
            input_tokens=rnd.randrange(20, 4000), output_tokens=rnd.randrange(1, 800),
            cost_usd=cost, baseline_cost_usd=baseline, saved_usd=baseline - cost,
            cache_status="hit-exact" if strategy == "exact_cache" else
            "hit-semantic" if hit else "miss",
            strategy=strategy, latency_ms=rnd.uniform(5, 3000),
            status=500 if rnd.random() < 0.01 else 200, route="auto: chat")


def build(db: Path, rows: int) -> float:
    """Write the rows through the ledger's transaction and insert; seconds taken."""
    ledger = SQLiteLedger(str(db), flush_interval=3600)
    batch: list[LedgerRecord] = []
    start = time.perf_counter()
    for record in synthetic_rows(rows):
        batch.append(record)
        if len(batch) == 10_000:
            with ledger._transaction() as insert:  # what the writer thread does per flush
                insert(batch)
            batch = []
    if batch:
        with ledger._transaction() as insert:
            insert(batch)
    elapsed = time.perf_counter() - start
    ledger.close()
    return elapsed


def serve(db: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    config = workdir / "skinflint.yaml"
    config.write_text(f"storage:\n  sqlite_path: {db}\n")
    env = {**os.environ, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "x"}
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "skinflint.cli", "serve", "--config", str(config),
         "--port", str(port)], cwd=workdir, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).json().get("ready"):
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the gateway did not start")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(client: httpx.Client, path: str, calls: int) -> tuple[float, float, int, int]:
    """Median and max milliseconds, and the answer's bytes and (for spend) series points."""
    resp = client.get(path)  # warm-up: the file's pages into the cache
    resp.raise_for_status()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        resp = client.get(path)
        times.append((time.perf_counter() - start) * 1000)
        resp.raise_for_status()
    body = resp.json()
    return statistics.median(times), max(times), len(resp.content), len(body.get("series", ()))


def measure(url: str, calls: int) -> list[tuple[str, float, float, int, int]]:
    paths = [f"/api/spend?by={by}&since={since}" for since in ("7d", "30d") for by in DIMENSIONS]
    paths += ["/api/spend?by=feature&since=2d&bucket=hour", "/api/spend?by=user&since=2d",
              "/api/requests?limit=50",
              "/api/requests?limit=500"]
    with httpx.Client(base_url=url, timeout=60) as client:
        return [(p, *timed(client, p, calls)) for p in paths]


def rebuild_once(db: Path) -> float:
    """Seconds a ledger made before rollups takes to build them, at start."""
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE ledger_rollup")
    conn.execute("DROP TABLE ledger_rollup_day")
    conn.commit()
    conn.close()
    start = time.perf_counter()
    SQLiteLedger(str(db), flush_interval=3600).close()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--calls", type=int, default=7)
    p.add_argument("--keep", type=Path, help="build (or reuse) the ledger in this directory")
    args = p.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="skinflint-spend-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "ledger.db"
    if not db.exists():
        took = build(db, args.rows)
        print(f"wrote {args.rows:,} rows with rollups in {took:.1f} s "
              f"({took / args.rows * 1e6:.1f} us/row, batches of 10,000)")
    conn = sqlite3.connect(db)
    (hours,) = conn.execute("SELECT COUNT(*) FROM ledger_rollup").fetchone()
    (days,) = conn.execute("SELECT COUNT(*) FROM ledger_rollup_day").fetchone()
    conn.close()
    print(f"{db}: {db.stat().st_size / 1e6:.0f} MB, rollup rows: {hours:,} hourly, "
          f"{days:,} daily")
    proc, url = serve(db, workdir)
    try:
        results = measure(url, args.calls)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\n{'request':48} {'median ms':>10} {'max ms':>8} {'KB':>7} {'series':>7}")
    for path, median, most, size, points in results:
        flag = "" if most < TARGET_MS else "  over target"
        print(f"{path:48} {median:10.1f} {most:8.1f} {size / 1000:7.0f} {points:7,}{flag}")
    print(f"\nbuilding the rollups of this ledger once, at start: {rebuild_once(db):.1f} s")


if __name__ == "__main__":
    main()
