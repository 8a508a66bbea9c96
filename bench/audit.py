"""``skinflint audit`` on a large synthetic traffic log, timed end to end.

The log (generated with a fixed seed, gzipped, in a temporary folder) is meant to look like a
real one: many features, each with its own multi-line system prompt sent with every call (some
with repeated lines), a few models with catalog prices, three tenants, hundreds of users, seven
days of traffic; questions from templates with slots and free-form ones; about 10% exact
duplicates (a request sent again) and about 5% paraphrases of an earlier question ("How do I"
-> "How can I", "What is" -> "What's", a dropped question mark), which the semantic cache may or
may not accept. The audit runs in-process with the default configuration (the local embedder,
its shipped threshold and verifier), the near-duplicate search included.

    python bench/audit.py                 # 100,000 lines
    python bench/audit.py --lines 20000

Prints the time of each stage and the total, and appends one JSON object per run to
``bench/results/audit.jsonl``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini")
VERBS = ("export", "delete", "rename", "share", "archive", "restore", "merge", "import",
         "download", "upload", "print", "sync", "lock", "refund", "transfer", "schedule")
NOUNS = ("invoice", "report", "workspace", "project", "contract", "receipt", "dashboard",
         "calendar", "folder", "ticket", "order", "subscription", "profile", "team", "budget",
         "spreadsheet", "playlist", "album", "backup", "webhook")
PLACES = ("the mobile app", "the web app", "the admin console", "the API", "Slack",
          "the desktop client", "my phone", "the billing page", "Outlook", "Google Drive")
_TOPICS = """latency spikes memory leaks onboarding pricing tiers audit logs encryption keys
customer churn quarterly revenue shipping delays warehouse stock supplier negotiation hiring plan
vacation policy expense claims travel booking gift cards loyalty points discount codes tax forms
payroll errors password rules login loops dark mode keyboard shortcuts offline access data
residency retention rules sso setup mobile push alerts email digests weekly summary compliance
checklist risk register incident review postmortem template release notes migration plan rate
limits"""
WORDS = tuple(_TOPICS.split())
OPENERS = ("How do I", "What is the best way to", "Can you explain how to", "Why can't I",
           "Is it possible to", "What is")


def _system(rng: random.Random, feature: str) -> str:
    rules = [f"Rule {i}: {' '.join(rng.choices(WORDS, k=12))}." for i in range(rng.randint(4, 9))]
    if rng.random() < 0.3:  # a copy-pasted instruction, as prompts that grew by hand have
        rules.append(rules[0])
    return f"You are the {feature} assistant of Acme.\n" + "\n".join(rules)


def _question(rng: random.Random) -> str:
    if rng.random() < 0.5:
        opener = rng.choice(OPENERS)
        return (f"{opener} {rng.choice(VERBS)} the {rng.choice(NOUNS)} "
                f"{rng.randint(100, 99999)} in {rng.choice(PLACES)}?")
    return (f"{rng.choice(OPENERS)} " + " ".join(rng.choices(WORDS, k=rng.randint(5, 14)))
            + "?")


def _paraphrase(rng: random.Random, text: str) -> str:
    for a, b in (("How do I", "How can I"), ("What is", "What's")):
        if text.startswith(a):
            return b + text[len(a):]
    return text.rstrip("?") if rng.random() < 0.7 else text.rstrip("?") + " please?"


def _call(rng: random.Random, ts: float, body: dict[str, Any], feature: str, tenant: str,
          user: str) -> dict[str, Any]:
    prompt = rng.randint(300, 3000) if rng.random() > 0.01 else rng.randint(20000, 60000)
    limit = body.get("max_tokens") or 1024
    completion = min(int(rng.lognormvariate(5, 0.8)), limit)
    finish = "length" if completion == limit else "stop"
    return {"timestamp": ts, "feature": feature, "tenant": tenant, "user": user,
            "request": body,
            "response": {"object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": finish,
                                      "message": {"role": "assistant", "content": "..."}}],
                         "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}}


def generate(path: Path, lines: int, seed: int = 5) -> None:
    rng = random.Random(seed)
    features = [f"feature-{i:02d}" for i in range(24)]
    systems = {f: _system(rng, f) for f in features}
    models = {f: rng.choice(MODELS) for f in features}
    limits = {f: rng.choice((256, 512, 1024, None)) for f in features}
    start, span = 1_767_225_600.0, 7 * 86400.0
    history: list[tuple[dict[str, Any], str, str, str]] = []
    with gzip.open(path, "wt") as f:
        for n in range(lines):
            ts = start + span * n / lines
            roll = rng.random()
            if history and roll < 0.10:  # the same request again
                body, feature, tenant, user = rng.choice(history)
            elif history and roll < 0.15:  # an earlier question in other words
                old, feature, tenant, user = rng.choice(history)
                question = _paraphrase(rng, old["messages"][-1]["content"])
                body = {**old, "messages": [old["messages"][0],
                                            {"role": "user", "content": question}]}
            else:
                feature = rng.choice(features)
                tenant = rng.choice(("acme", "globex", "initech"))
                user = f"user-{rng.randint(1, 600)}"
                body = {"model": models[feature], "temperature": 0,
                        "messages": [{"role": "system", "content": systems[feature]},
                                     {"role": "user", "content": _question(rng)}]}
                if limits[feature]:
                    body["max_tokens"] = limits[feature]
                history.append((body, feature, tenant, user))
            f.write(json.dumps(_call(rng, ts, body, feature, tenant, user)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    from skinflint.analytics.audit import run_audit
    from skinflint.config import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "traffic.jsonl.gz"
        began = time.perf_counter()
        generate(log, args.lines)
        print(f"generated {args.lines:,} lines in {time.perf_counter() - began:.1f} s"
              f" ({log.stat().st_size / 1e6:.1f} MB gzipped)")
        stages: dict[str, float] = {}
        began, cpu = time.perf_counter(), time.process_time()

        def tick(stage: str, done: int, total: int | None) -> None:
            stages.setdefault(stage, time.perf_counter() - began)

        result = run_audit(log, load_settings(None, env={}), on_progress=tick)
        total = time.perf_counter() - began
        cpu = time.process_time() - cpu
    marks = sorted(stages.items(), key=lambda kv: kv[1])
    took = {stage: nxt[1] - at
            for (stage, at), nxt in zip(marks, [*marks[1:], ("end", total)], strict=True)}
    for stage, seconds in took.items():
        print(f"  {stage:<28} {seconds:6.1f} s")
    print(f"audit of {args.lines:,} lines: {total:.1f} s (target < 60 s), {cpu:.1f} s of CPU"
          f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores);"
          f" exact duplicates {result['exact_duplicates']['share']:.1%},"
          f" near duplicates {result['near_duplicates']['share']:.1%},"
          f" compound saving {result['compound']['saving_share']:.1%}")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "lines": args.lines,
              "seconds": round(total, 2), "cpu_seconds": round(cpu, 2),
              "stages": {k: round(v, 2) for k, v in took.items()},
              "cpus": os.cpu_count(), "python": platform.python_version(),
              "load_avg": os.getloadavg()[0],
              "exact_share": result["exact_duplicates"]["share"],
              "near_share": result["near_duplicates"]["share"]}
    out = Path(__file__).parent / "results" / "audit.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
