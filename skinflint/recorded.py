"""Reading RouterBench-format recordings: prompts with every model's response, correctness and
cost. Used by the replay provider (to serve a dataset) and by the extract builder."""

from __future__ import annotations

import ast
import csv
import sys
from pathlib import Path
from typing import Any

__all__ = ["FILES", "model_names", "parse_cell", "read_csv", "read_samples", "to_sample"]

FILES = ("arc_challenge_train.csv", "mbpp_train.csv", "winograde_train.csv")
Row = dict[str, str]
Sample = dict[str, Any]


def parse_cell(cell: str) -> list[str]:
    """A cell holding a Python list literal of strings; an empty cell is an empty list."""
    if not cell:
        return []
    value = ast.literal_eval(cell)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"not a list of strings: {cell[:60]!r}")
    return value


def model_names(header: list[str]) -> list[str]:
    """The recorded models, in the order of their ``|total_cost`` columns."""
    return [h.split("|")[0] for h in header if h.endswith("|total_cost")]


def to_sample(row: Row, models: list[str]) -> Sample | None:
    """One record ``{"id", "eval", "prompt", "models": {m: {response, correct, cost}},
    "oracle"}``, or None for a row whose prompt is not exactly one string."""
    prompt = parse_cell(row["prompt"])
    if len(prompt) != 1:
        return None
    recorded: dict[str, dict[str, Any]] = {}
    for model in models:
        response = parse_cell(row.get(f"{model}|model_response", ""))
        label = row.get(model, "")
        recorded[model] = {
            "response": response[0] if response else "",
            "correct": None if label == "" else int(float(label)),
            "cost": float(row.get(f"{model}|total_cost") or 0.0),
        }
    return {"id": row["sample_id"], "eval": row["eval_name"], "prompt": prompt[0],
            "models": recorded, "oracle": row.get("oracle_model_to_route_to", "")}


def read_csv(path: Path) -> tuple[list[Sample], int]:
    """The clean samples of one RouterBench CSV, and how many rows were dropped."""
    csv.field_size_limit(sys.maxsize)
    samples: list[Sample] = []
    dropped = 0
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        if "prompt" not in header or not model_names(header):
            raise ValueError(f"{path} is not in RouterBench format (prompt, <model>|total_cost)")
        models = model_names(header)
        for row in reader:
            sample = to_sample(row, models)
            if sample is None:
                dropped += 1
            else:
                samples.append(sample)
    return samples, dropped


def read_samples(source: Path) -> tuple[list[Sample], int]:
    """A CSV file, or every ``*.csv`` of a directory (the three RouterBench files first)."""
    if source.is_file():
        return read_csv(source)
    names = [source / f for f in FILES if (source / f).exists()]
    names += sorted(p for p in source.glob("*.csv") if p not in names)
    if not names:
        raise ValueError(f"no RouterBench CSV files in {source}")
    samples: list[Sample] = []
    dropped = 0
    for name in names:
        got, lost = read_csv(name)
        samples += got
        dropped += lost
    return samples, dropped
