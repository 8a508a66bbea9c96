"""A traffic log built with a seeded RNG whose true figures are known: what each call costs at
the configured prices, which calls are exact duplicates, which are near duplicates (paraphrases
the shipped embedder and verifier accept), and which look alike but must not count."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from skinflint.cachekey import request_hash

PRICES = {"gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6)}
UNPRICED = "house-model-unlisted-7"
CONFIG = (
    "models:\n"
    + "".join(f"  {m}: {{provider: openai, price: {{input: {i}, output: {o}}}}}\n"
              for m, (i, o) in PRICES.items())
)
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
STEP = 137.0

SYSTEMS = {
    "support": "You are the support assistant of Acme Billing. Answer briefly.",
    "docs": "You answer questions about Python. Be precise.",
    "faq": "You answer frequently asked questions about our shop.",
}
#: (question, feature, model): distinct questions, no two alike
BASES = [
    ("What is the capital of France?", "faq", "gpt-4o"),
    ("How do I reset my password?", "support", "gpt-4o"),
    ("How do I export my invoices to a CSV file?", "support", "gpt-4o-mini"),
    ("What is the refund policy for annual plans?", "faq", "gpt-4o"),
    ("How do I change the email address on my account?", "support", "gpt-4o"),
    ("How do I cancel my subscription?", "support", "gpt-4o-mini"),
    ("What is the difference between a list and a tuple in Python?", "docs", "gpt-4o"),
    ("How do I add a new user to my team workspace?", "support", "gpt-4o"),
    ("How do I convert a string to an int in Python?", "docs", "gpt-4o-mini"),
    ("Where can I download my tax documents?", "faq", "gpt-4o-mini"),
    ("Which payment methods do you accept for business accounts?", "faq", "gpt-4o"),
    ("Write a haiku about autumn leaves falling on a quiet pond.", "docs", "gpt-4o"),
]
#: base index -> a paraphrase the shipped embedder and verifier accept
PARAPHRASES = {
    0: "What's the capital of France?",
    1: "How can I reset my password?",
    2: "How can I export my invoices to a CSV file?",
    4: "How can I change the email address on my account?",
    6: "What's the difference between a list and a tuple in Python?",
    9: "Where can I download my tax documents",
}
#: base index -> alike but different: too far apart, or refused by the verifier
NEAR_MISSES = {
    8: "How do I convert an int to a string in Python?",  # cosine 0.99, order differs
    0: "What is the capital of Spain?",
    3: "What is the refund policy for monthly plans?",
    5: "How do I renew my subscription?",
}


@dataclass
class Truth:
    requests: int = 0
    cost: float = 0.0
    unpriced: int = 0
    by: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(lambda: [0, 0.0])))
    exact: list[float] = field(default_factory=list)  # costs of exact duplicates
    near: list[float] = field(default_factory=list)
    #: (prompt, completion) tokens of the exact and of the near duplicates
    exact_tokens: list[tuple[int, int]] = field(default_factory=list)
    near_tokens: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Built:
    lines: list[dict[str, Any]]
    truth: Truth
    times: list[float]


def cost_of(model: str, prompt: int, completion: int) -> float | None:
    if model not in PRICES:
        return None
    i, o = PRICES[model]
    return (prompt * i + completion * o) / 1e6


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.t = T0
        self.lines: list[dict[str, Any]] = []
        self.truth = Truth()
        self.times: list[float] = []

    def body(self, question: str, feature: str, model: str) -> dict[str, Any]:
        return {"model": model, "max_tokens": 300, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEMS[feature]},
                             {"role": "user", "content": question}]}

    def add(self, body: dict[str, Any], feature: str, *, tenant: str = "",
            kind: str = "") -> dict[str, Any]:
        rng, model = self.rng, body["model"]
        prompt, completion = rng.randint(40, 2000), rng.randint(5, 300)
        user = f"user-{rng.randint(1, 4)}"
        self.t += STEP
        stamp: Any = self.t if rng.random() < 0.5 else datetime.fromtimestamp(
            self.t, UTC).isoformat().replace("+00:00", "Z")
        line = {"request": body, "timestamp": stamp, "feature": feature, "user": user,
                "response": {"id": "x", "object": "chat.completion", "model": model,
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "ok"}}],
                             "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                       "total_tokens": prompt + completion}}}
        if tenant:
            line["tenant"] = tenant
        cost = cost_of(model, prompt, completion)
        t = self.truth
        t.requests += 1
        t.unpriced += cost is None
        for group, name in (("feature", feature), ("model", model), ("user", user)):
            t.by[group][name][0] += 1
            t.by[group][name][1] += cost or 0.0
        t.cost += cost or 0.0
        if kind == "exact":
            t.exact.append(cost or 0.0)
            t.exact_tokens.append((prompt, completion))
        elif kind == "near":
            t.near.append(cost or 0.0)
            t.near_tokens.append((prompt, completion))
        self.lines.append(line)
        self.times.append(self.t)
        return line


def build_log(seed: int = 7) -> Built:
    """Originals, then exact duplicates, paraphrases (near duplicates), paraphrases in another
    partition (another tenant, another system prompt), near misses, an exact duplicate of a
    paraphrase and an unpriced call; the lines shuffled (each keeps its time)."""
    b = _Builder(seed)
    bodies = [b.body(q, f, m) for q, f, m in BASES]
    for body, (_, feature, _) in zip(bodies, BASES, strict=True):
        b.add(body, feature)
    for i in b.rng.sample(range(len(BASES)), 6):
        b.add(dict(bodies[i]), BASES[i][1], kind="exact")
    paraphrased = {}
    for i, text in PARAPHRASES.items():
        _, feature, model = BASES[i]
        paraphrased[i] = b.body(text, feature, model)
        b.add(paraphrased[i], feature, kind="near")
    _, feature, model = BASES[1]
    b.add(b.body(PARAPHRASES[1], feature, model), feature, tenant="acme")  # another scope
    other = b.body(PARAPHRASES[0], "docs", BASES[0][2])  # another system prompt
    b.add(other, "docs")
    for i, text in NEAR_MISSES.items():
        _, feature, model = BASES[i]
        b.add(b.body(text, feature, model), feature)
    b.add(dict(paraphrased[2]), BASES[2][1], kind="exact")
    b.add(b.body("Tell me a joke about accountants.", "faq", UNPRICED), "faq")
    b.rng.shuffle(b.lines)
    return Built(b.lines, b.truth, b.times)


def ledger_line(line: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The ledger export line the gateway would have written for ``line``."""
    body, usage = line["request"], line["response"]["usage"]
    stamp = line["timestamp"]
    ts = stamp if isinstance(stamp, float) else datetime.fromisoformat(
        stamp.replace("Z", "+00:00")).timestamp()
    model = body["model"]
    return {"kind": "skinflint.ledger", "request_id": f"r{ts}", "ts": ts,
            "request_hash": request_hash("chat", body), "tenant": line.get("tenant", "default"),
            "feature": line["feature"], "user": line["user"], "requested_model": model,
            "model": model, "input_tokens": usage["prompt_tokens"],
            "output_tokens": usage["completion_tokens"],
            "cost_usd": cost_of(model, usage["prompt_tokens"], usage["completion_tokens"]),
            "strategy": "", "status": 200, **extra}
