"""batch_map benchmark: a 1,000-item classification job through the real gateway, item by item
versus in-prompt batching, with the upstream dropping 2% of the items from its JSON answers.

Data: the first 1,000 distinct questions (``text_a``) of ``shared/data/semantic_cache/
qqp_pairs_dev.jsonl`` (Quora Question Pairs; see ``shared/data/README.md``), each to be put in
one of eight topics by an instruction that defines them (about 200 tokens; a one-sentence
instruction is measured too, where the saving is smaller).

Both paths go through one gateway (``BackgroundServer``, exact cache off so that neither is
helped by it) in front of the fake upstream on loopback (``tests/fake_upstream.py``), which
answers a packed request with ``tests/fake_packed.py`` (a keyword topic for each item; 2% of the
items dropped from the JSON, drawn from a seeded hash) and a single item with its topic.

- item by item: 1,000 chat completions (system = the instruction, user = the question), 8 at
  a time, with the openai SDK;
- batch_map: one ``POST /v1/skinflint/batch_map`` with the same instruction and items.

Input tokens are counted on what the upstream received, with the tokenizer of the model
(``TokenCounter.count_messages``, tiktoken o200k for gpt-4o-mini); for packed calls the JSON
schema of ``response_format`` is counted too (providers bill it as prompt). The run checks
that every item has an answer, in input order, equal to its topic. Each run appends one JSON
object to ``bench/results/batch_map.jsonl`` and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skinflint.config import settings_from_dict  # noqa: E402
from skinflint.server.run import BackgroundServer  # noqa: E402
from skinflint.tokens import TokenCounter  # noqa: E402
from tests.fake_packed import PackedAnswerer, packed_items  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402

# ``../shared/data`` beside the checkout (a worktree may sit a level deeper)
DATA = next((p / "shared" / "data" for p in ROOT.parents if (p / "shared" / "data").is_dir()),
            ROOT.parent / "shared" / "data") / "semantic_cache" / "qqp_pairs_dev.jsonl"
RESULTS = ROOT / "bench" / "results" / "batch_map.jsonl"
MODEL = "gpt-4o-mini"
TOKENS = TokenCounter()

TOPICS: dict[str, tuple[str, ...]] = {
    "technology": ("computer", "phone", "software", "app", "internet", "google", "iphone",
                   "android", "programming", "code", "laptop", "facebook", "data"),
    "science": ("physics", "chemistry", "biology", "space", "earth", "universe", "science",
                "energy", "planet", "math"),
    "health": ("health", "weight", "doctor", "disease", "body", "diet", "pain", "sleep",
               "medicine", "exercise"),
    "money": ("money", "bank", "invest", "stock", "job", "salary", "business", "pay", "tax",
              "rupee", "notes", "economy"),
    "education": ("study", "college", "university", "exam", "school", "learn", "student",
                  "course", "engineering", "book"),
    "politics": ("trump", "clinton", "election", "president", "government", "india", "modi",
                 "war", "country", "law"),
    "relationships": ("love", "girlfriend", "boyfriend", "friend", "marry", "relationship",
                      "wife", "husband", "family", "sex"),
}
OTHER = "other"

INSTRUCTION = (
    "You label questions asked on a public Q&A site so that they can be routed to the right "
    "community moderators. Put each question in exactly one of these topics:\n"
    "- technology: computers, phones, software, apps, the internet, programming, gadgets;\n"
    "- science: physics, chemistry, biology, astronomy, mathematics, the natural world;\n"
    "- health: medicine, illness, fitness, diet, sleep, mental health;\n"
    "- money: jobs, careers, salaries, banking, investing, taxes, business, the economy;\n"
    "- education: schools, universities, exams, studying, courses, learning a skill;\n"
    "- politics: elections, governments, politicians, laws, international relations;\n"
    "- relationships: dating, marriage, friendship, family, sexuality;\n"
    "- other: anything else (entertainment, travel, philosophy, personal advice, ...).\n"
    "When a question touches several topics, choose the one its asker most needs an expert "
    "in. Do not explain. Answer with the topic's name only, in lower case."
)
TERSE = "Label the question's topic: technology, science, health, money, education, " \
        "politics, relationships or other."


def topic(text: Any) -> str:
    words = str(text).lower()
    for name, keys in TOPICS.items():
        if any(k in words for k in keys):
            return name
    return OTHER


def load_items(n: int) -> list[str]:
    seen: dict[str, None] = {}
    with DATA.open() as f:
        for line in f:
            seen.setdefault(json.loads(line)["text_a"].strip(), None)
            if len(seen) >= n:
                break
    return list(seen)


def single_answerer(body: dict[str, Any]) -> str | None:
    """A one-item call: the question's topic."""
    messages = body.get("messages") or []
    if packed_items(body) is not None or not messages:
        return None
    return topic(messages[-1].get("content"))


def upstream_tokens(fake: FakeUpstream) -> tuple[int, int]:
    """Input tokens of the chat requests the upstream received, and how many requests."""
    total, calls = 0, 0
    for call in fake.calls():
        body = call.body or {}
        total += TOKENS.count_messages(MODEL, body.get("messages") or [])
        if "response_format" in body:
            total += TOKENS.count_text(MODEL, json.dumps(body["response_format"]))
        calls += 1
    return total, calls


async def item_by_item(base_url: str, items: list[str], instruction: str) -> list[str]:
    gate = asyncio.Semaphore(8)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=2) as client:
        async def one(text: str) -> str:
            async with gate:
                reply = await client.chat.completions.create(
                    model=MODEL, temperature=0, max_tokens=8,
                    messages=[{"role": "system", "content": instruction},
                              {"role": "user", "content": text}])
            return reply.choices[0].message.content or ""
        return list(await asyncio.gather(*(one(t) for t in items)))


def batch_map(base_url: str, items: list[str], instruction: str) -> dict[str, Any]:
    resp = httpx.post(f"{base_url}/skinflint/batch_map", timeout=600,
                      json={"model": MODEL, "instruction": instruction, "items": items})
    resp.raise_for_status()
    found: dict[str, Any] = resp.json()
    return found


def settings(fake: FakeUpstream, db: Path) -> Any:
    return settings_from_dict({
        "providers": {"fake": {"kind": "openai-compatible", "base_url": fake.base_url,
                               "api_key": "sk-bench", "timeout": 30}},
        "models": {MODEL: {"provider": "fake"}},
        "default_provider": "fake",
        "cache": {"exact": {"enabled": False}},
        "storage": {"sqlite_path": str(db)},
    }, env={})


def measure(fake: FakeUpstream, gw: BackgroundServer, items: list[str], instruction: str,
            drop: float, seed: int) -> dict[str, Any]:
    fake.reset()
    fake.add_answerer(single_answerer)
    started = time.perf_counter()
    singles = asyncio.run(item_by_item(gw.base_url, items, instruction))
    single_s = time.perf_counter() - started
    single_tokens, single_calls = upstream_tokens(fake)
    assert singles == [topic(t) for t in items], "item by item: a wrong answer"

    fake.reset()
    answerer = PackedAnswerer(drop=drop, seed=seed, label=topic)
    fake.add_answerer(answerer)
    started = time.perf_counter()
    answer = batch_map(gw.base_url, items, instruction)
    packed_s = time.perf_counter() - started
    packed_tokens, packed_calls = upstream_tokens(fake)
    results = answer["results"]
    in_order = [r["id"] for r in results] == [str(i) for i in range(len(items))]
    correct = sum(r["output"] == topic(t) for r, t in zip(results, items, strict=True))
    statuses = Counter(r["status"] for r in results)
    return {
        "instruction_tokens": TOKENS.count_text(MODEL, instruction),
        "item_by_item": {"input_tokens": single_tokens, "calls": single_calls,
                         "wall_s": round(single_s, 2)},
        "batch_map": {"input_tokens": packed_tokens, "calls": packed_calls,
                      "calls_reported": answer["calls"], "wall_s": round(packed_s, 2),
                      "dropped_by_upstream": answerer.faults["drop"],
                      "statuses": dict(statuses), "in_order": in_order,
                      "correct": correct, "cost_usd": answer["cost_usd"]},
        "input_tokens_saved": round(1 - packed_tokens / single_tokens, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--drop", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=17,
                        help="which items the upstream drops (17: 20 of the first 1,000)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if not DATA.exists():
        print(f"skipped: {DATA} is absent")
        return 0
    items = load_items(args.items)
    TOKENS.prepare(MODEL)
    runs: dict[str, Any] = {}
    with FakeUpstream() as fake, tempfile.TemporaryDirectory() as tmp, \
            BackgroundServer(settings(fake, Path(tmp) / "ledger.db")) as gw:
        for name, instruction in (("detailed", INSTRUCTION), ("terse", TERSE)):
            runs[name] = measure(fake, gw, items, instruction, args.drop, args.seed)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    record = {"ts": time.time(), "commit": commit, "machine": platform.machine(),
              "python": platform.python_version(), "items": len(items), "drop": args.drop,
              "seed": args.seed,
              "model": MODEL, "runs": runs}
    for name, run in runs.items():
        one, packed = run["item_by_item"], run["batch_map"]
        print(f"{name} instruction ({run['instruction_tokens']} tokens), {len(items)} items:")
        print(f"  item by item: {one['input_tokens']:>7} input tokens, {one['calls']:>4} calls, "
              f"{one['wall_s']:.1f} s")
        print(f"  batch_map:    {packed['input_tokens']:>7} input tokens, {packed['calls']:>4} "
              f"calls, {packed['wall_s']:.1f} s; {run['input_tokens_saved']:.1%} fewer input "
              f"tokens")
        print(f"  upstream dropped {packed['dropped_by_upstream']} items; statuses "
              f"{packed['statuses']}; in order: {packed['in_order']}; correct "
              f"{packed['correct']}/{len(items)}")
    if not args.no_save:
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
