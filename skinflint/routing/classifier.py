"""The trained task classifier: prompt text -> task name, with a confidence."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from skinflint.routing.linear import LogisticModel, Vocabulary, pack, unpack

__all__ = ["TaskClassifier"]


class TaskClassifier:
    def __init__(self, vocabulary: Vocabulary, model: LogisticModel) -> None:
        self.vocabulary = vocabulary
        self.model = model

    @property
    def tasks(self) -> list[str]:
        return self.model.classes

    @classmethod
    def train(
        cls,
        texts: Sequence[str],
        tasks: Sequence[str],
        *,
        vocab_size: int = 2000,
        epochs: int = 200,
    ) -> TaskClassifier:
        if len(set(tasks)) < 2:
            raise ValueError("a task classifier needs examples of at least two tasks")
        vocabulary = Vocabulary.fit(texts, size=vocab_size)
        x = np.stack([vocabulary.vector(t) for t in texts])
        return cls(vocabulary, LogisticModel.fit(x, tasks, epochs=epochs))

    def classify(self, text: str) -> tuple[str, float]:
        return self.model.predict(self.vocabulary.vector(text))

    def to_bytes(self) -> bytes:
        return pack(terms=np.array(self.vocabulary.terms), **self.model.arrays())

    @classmethod
    def from_bytes(cls, data: bytes) -> TaskClassifier:
        arrays = unpack(data)
        return cls(Vocabulary([str(t) for t in arrays["terms"]]), LogisticModel.from_arrays(arrays))

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> TaskClassifier:
        return cls.from_bytes(Path(path).read_bytes())
