"""Budget exactness under concurrency: 200 requests at once against a budget worth 10.

For each deployment it starts, on loopback only, the mock upstream (``bench/mock_upstream.py``)
and ``skinflint serve`` with one budget (``per: global``, ``limit: {requests: 10}``), sends 200
chat requests at once (distinct prompts, so nothing is served from a cache), and counts the
answers by status, the requests that reached the upstream, and what ``GET /api/budgets`` says
was spent and is still reserved. Deployments:

* one process, the counters in its SQLite file;
* ``serve --workers 2``, both workers sharing the SQLite file;
* two replicas (two ``serve`` processes on their own ports and folders) sharing a throwaway
  ``redis-server``; the 200 requests are split between them.

Exactly 10 must pass each time (429 ``budget_exceeded`` for the others).

    python bench/budgets.py [--requests 200] [--limit 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import (  # the gateway benchmark's process helpers
    HOST,
    MOCK,
    free_port,
    mock_stats,
    skinflint_argv,
    spawn,
    start_redis,
    stop_all,
    wait_healthy,
)


def _serve(name: str, home: Path, logs: Path, config: dict[str, Any], mock_port: int,
           *extra: str) -> int:
    home.mkdir(parents=True)
    (home / "skinflint.yaml").write_text(json.dumps(config))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKINFLINT_")}
    env.update(OPENAI_BASE_URL=f"http://{HOST}:{mock_port}/v1", OPENAI_API_KEY="sk-bench")
    port = free_port()
    argv = [*skinflint_argv(port, home / "skinflint.yaml"), *extra]
    wait_healthy(spawn(name, argv, env=env, cwd=home, log_dir=logs), port, "/health", 60.0)
    return port


async def _burst(ports: list[int], n: int) -> Counter[int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        replies = await asyncio.gather(*(
            http.post(f"http://{HOST}:{ports[i % len(ports)]}/v1/chat/completions",
                      json={"model": "gpt-4o-mini",
                            "messages": [{"role": "user", "content": f"question {i}"}]})
            for i in range(n)))
    return Counter(r.status_code for r in replies)


def _budget(port: int) -> dict[str, Any]:
    (row,) = httpx.get(f"http://{HOST}:{port}/api/budgets").json()["data"]
    return row  # type: ignore[no-any-return]


def run(requests: int, limit: int) -> bool:
    budget = {"name": "ten", "per": "global", "window": "day", "limit": {"requests": limit}}
    ok = True
    with tempfile.TemporaryDirectory(prefix="skinflint-budgets-") as tmp:
        work = Path(tmp)
        logs = work / "logs"
        logs.mkdir()
        try:
            print(f"{'deployment':34} {'200':>5} {'429':>5} {'other':>5} {'upstream':>8} "
                  f"{'spent':>6} {'reserved':>8}")
            alone = {"budgets": [budget]}
            deployments: list[tuple[str, list[tuple[str, tuple[str, ...]]], bool]] = [
                ("1 process, SQLite", [("one", ())], False),
                ("--workers 2, SQLite", [("two", ("--workers", "2"))], False),
                ("2 replicas, one Redis", [("replica-a", ()), ("replica-b", ())], True),
            ]
            for label, servers, redis in deployments:
                config: dict[str, Any] = alone
                if redis:
                    if not shutil.which("redis-server"):
                        print(f"{label:34} not measured: no redis-server")
                        continue
                    _, redis_port, _ = start_redis(work, logs)
                    config = {**alone, "storage": {"redis_url": f"redis://{HOST}:{redis_port}/0"}}
                mock_port = free_port()
                mock = spawn(f"mock-{servers[0][0]}", [sys.executable, str(MOCK), "--host", HOST,
                                                     "--port", str(mock_port)],
                             env=dict(os.environ), cwd=work, log_dir=logs)
                wait_healthy(mock, mock_port, "/_mock/stats", 30.0)
                ports = [_serve(name, work / name, logs, config, mock_port, *extra)
                         for name, extra in servers]
                counts = asyncio.run(_burst(ports, requests))
                row = _budget(ports[0])
                upstream = int(mock_stats(mock_port).get("chat_requests", -1))
                other = requests - counts[200] - counts[429]
                print(f"{label:34} {counts[200]:5d} {counts[429]:5d} {other:5d} {upstream:8d} "
                      f"{row['spent']['requests']:6d} {row['reserved']['requests']:8d}")
                ok &= (counts[200] == limit and counts[429] == requests - limit
                       and row["spent"]["requests"] == limit and row["reserved"]["requests"] == 0)
                stop_all()
        finally:
            stop_all()
    print("exactly", limit, "passed each time" if ok else "NOT exact")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--limit", type=int, default=10)
    args = parser.parse_args()
    return 0 if run(args.requests, args.limit) else 1


if __name__ == "__main__":
    sys.exit(main())
