"""Lexical features and logistic regression, in numpy.

Features are counts of a learned vocabulary of word unigrams and bigrams (plus a few dense
features the caller appends), scaled by ``log1p`` and L2-normalised. A vocabulary lookup is a
dict access per token, which keeps a decision well under a millisecond for prompts of a few
thousand tokens; hashing every token in Python would not.
"""

from __future__ import annotations

import io
import itertools
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["LogisticModel", "Vocabulary", "pack", "tokens", "unpack"]

Vector = npt.NDArray[np.float32]
_WORD = re.compile(r"[a-z0-9_]+|[^\sa-z0-9_]")


def tokens(text: str, limit: int = 4000) -> list[str]:
    """Lower-cased words and punctuation marks, then bigrams; at most ``limit`` characters
    from each end of the text are read, which bounds the cost of very long prompts."""
    text = text.lower()
    if len(text) > 2 * limit:
        text = text[:limit] + " " + text[-limit:]
    words = _WORD.findall(text)
    return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]


class Vocabulary:
    def __init__(self, terms: Sequence[str]) -> None:
        self.terms = list(terms)
        self.index = {t: i for i, t in enumerate(self.terms)}

    @classmethod
    def fit(cls, texts: Iterable[str], *, size: int = 4000, min_df: int = 2) -> Vocabulary:
        df: Counter[str] = Counter()
        for text in texts:
            df.update(set(tokens(text)))
        common = [t for t, n in df.most_common() if n >= min_df][:size]
        return cls(sorted(common))

    def vector(self, text: str, dense: Sequence[float] = ()) -> Vector:
        out = np.zeros(len(self.terms) + len(dense), dtype=np.float32)
        index = self.index
        for tok in tokens(text):
            i = index.get(tok)
            if i is not None:
                out[i] += 1.0
        np.log1p(out[: len(self.terms)], out=out[: len(self.terms)])
        norm = float(np.linalg.norm(out[: len(self.terms)]))
        if norm:
            out[: len(self.terms)] /= norm
        out[len(self.terms) :] = dense
        return out


class LogisticModel:
    """Multinomial (or binary, with two classes) logistic regression with L2 regularisation,
    trained by full-batch gradient descent with Nesterov momentum."""

    def __init__(
        self,
        weights: npt.NDArray[np.float32],
        bias: npt.NDArray[np.float32],
        classes: Sequence[str],
    ) -> None:
        self.weights = weights
        self.bias = bias
        self.classes = list(classes)

    @classmethod
    def fit(
        cls,
        x: npt.NDArray[np.float32],
        labels: Sequence[str],
        *,
        l2: float = 1e-3,
        epochs: int = 300,
        lr: float = 0.5,
        sample_weight: Sequence[float] | None = None,
    ) -> LogisticModel:
        classes = sorted(set(labels))
        y = np.zeros((len(labels), len(classes)), dtype=np.float32)
        y[np.arange(len(labels)), [classes.index(label) for label in labels]] = 1.0
        sw = (
            np.ones(len(labels), np.float32)
            if sample_weight is None
            else np.asarray(sample_weight, np.float32)
        )
        sw = sw / sw.sum()
        w = np.zeros((x.shape[1], len(classes)), np.float32)
        b = np.zeros(len(classes), np.float32)
        vw, vb = np.zeros_like(w), np.zeros_like(b)
        for _ in range(epochs):
            lw, lb = w + 0.9 * vw, b + 0.9 * vb
            grad = (_softmax(x @ lw + lb) - y) * sw[:, None]
            vw = 0.9 * vw - lr * (x.T @ grad + l2 * lw)
            vb = 0.9 * vb - lr * grad.sum(axis=0)
            w, b = w + vw, b + vb
        return cls(w.astype(np.float32), b.astype(np.float32), classes)

    def proba(self, x: Vector) -> npt.NDArray[np.float32]:
        return _softmax(x @ self.weights + self.bias)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        """The model as arrays (weights stored as float16: half the size, same decisions)."""
        return {
            "classes": np.array(self.classes),
            "weights": self.weights.astype(np.float16),
            "bias": self.bias,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, npt.NDArray[Any]]) -> LogisticModel:
        return cls(
            arrays["weights"].astype(np.float32),
            arrays["bias"].astype(np.float32),
            [str(c) for c in arrays["classes"]],
        )

    def predict(self, x: Vector) -> tuple[str, float]:
        p = self.proba(x)
        i = int(np.argmax(p))
        return self.classes[i], float(p[i])


def pack(**arrays: npt.NDArray[Any]) -> bytes:
    """Arrays as one compressed ``.npz`` (no pickles: loading runs no code)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def unpack(data: bytes) -> dict[str, npt.NDArray[Any]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def _softmax(z: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: npt.NDArray[np.float32] = e / e.sum(axis=-1, keepdims=True)
    return out
