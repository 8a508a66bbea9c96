"""The trained models routes use: a task classifier per route and one correctness scorer,
shipped in the package (``default``) or written by ``skinflint train-router``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from skinflint.config import Settings
from skinflint.errors import ConfigError
from skinflint.routing.classifier import TaskClassifier
from skinflint.routing.scorer import CorrectnessScorer

__all__ = ["load_classifiers", "load_scorer"]


def _artifact(path: str, shipped: str) -> bytes:
    if path == "default":
        return (resources.files("skinflint") / "data" / shipped).read_bytes()
    return Path(path).read_bytes()


def load_classifiers(settings: Settings) -> dict[str, TaskClassifier | None]:
    """Each route's classifier (None for a route without one)."""
    return {
        name: TaskClassifier.from_bytes(_artifact(r.classifier, "classifier.npz"))
        if r.classifier
        else None
        for name, r in settings.routes.items()
    }


def load_scorer(settings: Settings) -> CorrectnessScorer | None:
    """The scorer the routes name; every route must name the same one."""
    paths = {r.scorer for r in settings.routes.values() if r.scorer}
    if len(paths) > 1:
        raise ConfigError("routes: all routes must share one scorer")
    return CorrectnessScorer.from_bytes(_artifact(paths.pop(), "scorer.npz")) if paths else None
