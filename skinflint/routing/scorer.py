"""The learned correctness scorer: P(an answer is correct | prompt, answer, model).

FrugalGPT's quality estimator, made small: logistic regression over the prompt's and the
answer's lexical features, which model answered, how long the answer is, and how many earlier
cascade tiers gave the same answer. Trained from recorded (prompt, answer, label) triples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from skinflint.routing.linear import LogisticModel, Vocabulary, pack, unpack

__all__ = ["CorrectnessScorer", "Example"]


@dataclass(frozen=True, slots=True)
class Example:
    prompt: str
    answer: str
    model: str
    agreement: float | None
    correct: int


class CorrectnessScorer:
    def __init__(
        self, prompts: Vocabulary, answers: Vocabulary, models: Sequence[str], model: LogisticModel
    ) -> None:
        self.prompts = prompts
        self.answers = answers
        self.models = list(models)
        self._model_index = {m: i for i, m in enumerate(self.models)}
        self.model = model

    def _dense(self, answer: str, model: str, agreement: float | None) -> list[float]:
        onehot = [0.0] * (len(self.models) + 1)
        onehot[self._model_index.get(model, len(self.models))] = 1.0
        has_agreement = 0.0 if agreement is None else 1.0
        return [
            *onehot,
            math.log1p(len(answer)) / 8,
            has_agreement,
            agreement or 0.0,
            (agreement or 0.0) * has_agreement,
        ]

    def features(
        self, prompt: str, answer: str, model: str, agreement: float | None
    ) -> npt.NDArray[np.float32]:
        return np.concatenate(
            [
                self.prompts.vector(prompt),
                self.answers.vector(answer),
                np.asarray(self._dense(answer, model, agreement), np.float32),
            ]
        )

    def score(self, prompt: str, answer: str, model: str, *, agreement: float | None) -> float:
        p = self.model.proba(self.features(prompt, answer, model, agreement))
        return float(p[self.model.classes.index("1")]) if "1" in self.model.classes else 0.0

    @classmethod
    def train(
        cls,
        examples: Sequence[Example],
        *,
        vocab_size: int = 500,
        epochs: int = 150,
        l2: float = 1e-3,
    ) -> CorrectnessScorer:
        if len({e.correct for e in examples}) < 2:
            raise ValueError("a scorer needs both correct and incorrect examples")
        prompts = Vocabulary.fit((e.prompt for e in examples), size=vocab_size)
        answers = Vocabulary.fit((e.answer for e in examples), size=vocab_size)
        models = sorted({e.model for e in examples})
        untrained = cls(
            prompts,
            answers,
            models,
            LogisticModel(np.zeros((1, 1), np.float32), np.zeros(1, np.float32), ["1"]),
        )
        x = np.stack(
            [untrained.features(e.prompt, e.answer, e.model, e.agreement) for e in examples]
        )
        fitted = LogisticModel.fit(x, [str(e.correct) for e in examples], epochs=epochs, l2=l2)
        return cls(prompts, answers, models, fitted)

    def to_bytes(self) -> bytes:
        return pack(
            prompt_terms=np.array(self.prompts.terms),
            answer_terms=np.array(self.answers.terms),
            models=np.array(self.models),
            **self.model.arrays(),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> CorrectnessScorer:
        a = unpack(data)
        return cls(
            Vocabulary([str(t) for t in a["prompt_terms"]]),
            Vocabulary([str(t) for t in a["answer_terms"]]),
            [str(m) for m in a["models"]],
            LogisticModel.from_arrays(a),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())
