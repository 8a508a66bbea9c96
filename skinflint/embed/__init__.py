"""Text embedders: one Protocol and a factory that builds one by name.

An embedder turns texts into unit-length float32 vectors; the dot product of two of them is
their cosine similarity. Embedders are synchronous and CPU-bound: the gateway calls them from a
worker thread, never on the event loop. Every embedder named here loads its files from installed
packages only, so building one never touches the network.

Names understood by :func:`load_embedder`:

==============================  ==============================================================
``local`` (also ``minilm``)     all-MiniLM-L6-v2 with int8 weights and int8 activations on
                                onnxruntime, 384 dimensions (the default; see ``local.py``)
``minilm-questions``            the same model fine-tuned on labelled duplicate questions:
                                more hits at precision 0.85-0.93, about the same at 0.95
``wordllama``                   static 256-d word embeddings, about 100x faster, weaker
``hashing``                     character n-gram hashing, no model: tests and a last resort
``sentence-transformers:PATH``  any sentence-transformers model directory the user installed
==============================  ==============================================================

:class:`skinflint.embed.openai_compat.OpenAIEmbedder` calls an OpenAI-compatible embeddings
endpoint instead; it needs a URL and a key, so it is built from configuration, not by name.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from skinflint.config import Settings
from skinflint.errors import ConfigError

__all__ = ["Embedder", "Vectors", "canonical_name", "embedder_for", "load_embedder"]

Vectors = npt.NDArray[np.float32]


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to L2-normalised vectors.

    ``name`` identifies the vector space: vectors from embedders with different names must never
    be compared, so stores key their entries by it. ``embed`` returns a float32 array of shape
    ``(len(texts), dim)`` whose rows have unit norm, and gives a text the same vector whatever
    else is in the batch. It is safe to call from several threads at once.
    """

    name: str
    dim: int

    def embed(self, texts: list[str]) -> Vectors: ...


def canonical_name(name: str) -> str:
    """The name an embedder is configured by, with aliases resolved (``minilm`` is ``local``):
    two names are the same embedder exactly when their canonical names are equal."""
    return "local" if name == "minilm" else name


def load_embedder(name: str) -> Embedder:
    """Build the embedder called ``name`` (see the module docstring for the names).

    Raises :class:`~skinflint.errors.ConfigError` for an unknown name or when the packages the
    embedder needs are not installed; the message says what to install.
    """
    from skinflint.embed import local  # deferred: keeps importing this package cheap

    if canonical_name(name) == "local":
        return local.MiniLMEmbedder()
    if name == "minilm-questions":
        return local.MiniLMEmbedder(tuned=local.tuned_weights())
    if name == "wordllama":
        return local.WordLlamaEmbedder()
    if name == "hashing":
        return local.HashingEmbedder()
    prefix = "sentence-transformers:"
    if name.startswith(prefix) and len(name) > len(prefix):
        return local.SentenceTransformerEmbedder(name[len(prefix):])
    raise ConfigError(
        f"unknown embedder {name!r}: expected 'local', 'minilm-questions', 'wordllama', 'hashing' "
        "or 'sentence-transformers:<path>'"
    )


def embedder_for(settings: Settings) -> Embedder:
    """The semantic cache's embedder, as ``cache.semantic`` configures it."""
    cfg = settings.cache.semantic
    if cfg.embedder != "openai-compatible":
        return load_embedder(cfg.embedder)
    from skinflint.embed.openai_compat import OpenAIEmbedder

    assert cfg.embedder_provider is not None  # checked when the settings were validated
    provider = settings.providers[cfg.embedder_provider]
    return OpenAIEmbedder(
        provider.base_url,
        cfg.embedder_model,
        cfg.embedder_dim,
        api_key=provider.api_key or None,
        timeout=provider.connect_timeout,
    )
