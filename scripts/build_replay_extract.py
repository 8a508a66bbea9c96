"""Build ``skinflint/data/routerbench.jsonl.gz``, the recorded outputs the replay provider serves.

Usage: ``python scripts/build_replay_extract.py [ROUTERBENCH_DIR] [--out FILE]``

Reads the three RouterBench CSVs (default ``../shared/data/routerbench`` next to the repository
root) and writes one JSON object per sample, gzip level 9 with a zero timestamp so the output is
byte-for-byte reproducible::

    {"id", "eval", "prompt", "models": {model: {"response", "correct", "cost"}}, "oracle"}

Rows whose prompt cell holds more than one string are dropped: they are merge artefacts of the
source (the same prompt twice, costs counting it twice, no correctness labels), and seven of the
eight repeat the ``sample_id`` of a clean row. The script then checks that prompts are unique,
that the extract is at most 2 MB, and that ``REPLAY_PRICES`` reproduces every recorded cost from
the token counts, and prints the least-squares price fit per model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from skinflint.recorded import read_samples

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 2 * 1024 * 1024
Sample = dict[str, Any]


def check_unique(samples: list[Sample]) -> None:
    """Prompts (stripped) and ids must be unique: the replay provider looks samples up by them."""
    for field in ("id", "prompt"):
        counts = Counter(str(s[field]).strip() for s in samples)
        repeated = [k for k, n in counts.items() if n > 1]
        if repeated:
            raise SystemExit(f"{len(repeated)} repeated {field}s, e.g. {repeated[0][:60]!r}")


def encode(samples: list[Sample]) -> bytes:
    """The gzip-9 JSON-lines bytes, reproducible (no timestamp, no file name)."""
    text = "".join(json.dumps(s, ensure_ascii=False, separators=(",", ":")) + "\n"
                   for s in samples)
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def fit_prices(samples: list[Sample], model: str) -> tuple[float, float]:
    """Least-squares (input, output) USD per million tokens with no intercept (2x2 normal eqs)."""
    from skinflint.providers.replay import count_tokens

    sxx = sxy = syy = sxc = syc = 0.0
    for s in samples:
        x = float(count_tokens(s["prompt"]))
        y = float(count_tokens(s["models"][model]["response"]))
        c = s["models"][model]["cost"] * 1e6
        sxx, sxy, syy, sxc, syc = sxx + x * x, sxy + x * y, syy + y * y, sxc + x * c, syc + y * c
    det = sxx * syy - sxy * sxy
    return (sxc * syy - syc * sxy) / det, (syc * sxx - sxc * sxy) / det


def max_relative_error(samples: list[Sample], model: str) -> float:
    """Largest |predicted - recorded| / recorded cost under ``REPLAY_PRICES``."""
    from skinflint.providers.replay import REPLAY_PRICES, count_tokens

    rate_in, rate_out = REPLAY_PRICES[model]
    worst = 0.0
    for s in samples:
        recorded = s["models"][model]
        predicted = (count_tokens(s["prompt"]) * rate_in
                     + count_tokens(recorded["response"]) * rate_out) / 1e6
        worst = max(worst, abs(predicted - recorded["cost"]) / recorded["cost"])
    return worst


def report_prices(samples: list[Sample]) -> None:
    """Print each model's fitted rates, the table's rates, and the table's worst error."""
    from skinflint.providers.replay import REPLAY_PRICES, token_counter

    print(f"token counter: {token_counter()}")
    for model in samples[0]["models"]:
        fit_in, fit_out = fit_prices(samples, model)
        print(f"  {model:36s} fit {fit_in:8.4f} / {fit_out:8.4f}  table "
              f"{REPLAY_PRICES[model]}  max rel err {max_relative_error(samples, model):.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path,
                        default=ROOT.parent / "shared" / "data" / "routerbench")
    parser.add_argument("--out", type=Path, default=ROOT / "skinflint" / "data"
                        / "routerbench.jsonl.gz")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:  # run from a checkout without installing the package
        sys.path.insert(0, str(ROOT))
    samples, dropped = read_samples(args.source)
    check_unique(samples)
    data = encode(samples)
    if len(data) > MAX_BYTES:
        raise SystemExit(f"extract is {len(data)} bytes, over the {MAX_BYTES} limit")
    args.out.write_bytes(data)
    per_eval = Counter(s["eval"] for s in samples)
    print(f"wrote {args.out}: {len(samples)} samples {dict(per_eval)}, "
          f"{len(samples[0]['models'])} models, {len(data)} bytes; dropped {dropped} rows")
    report_prices(samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
