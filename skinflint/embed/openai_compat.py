"""An embedder that calls an OpenAI-compatible ``POST /embeddings`` endpoint.

Synchronous like every embedder (the gateway runs it in a worker thread), over the standard
library's HTTP client so that it adds no dependency. The HTTP call is injectable (``post``) so
tests need no server. Vendor failures become :mod:`skinflint.errors` upstream errors here.
Building one makes no request: ``dim`` is given, and checked against each answer.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np

from skinflint.embed import Vectors
from skinflint.errors import (
    UpstreamConnectionError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)

__all__ = ["OpenAIEmbedder", "Post"]

# (url, headers, body) -> parsed JSON answer; raises skinflint upstream errors.
Post = Callable[[str, dict[str, str], bytes], Any]


class OpenAIEmbedder:
    """Embeddings from ``{base_url}/embeddings`` with ``model``; rows are re-normalised.

    ``name`` is ``openai:<model>:<dim>``, so that a change of model or size never mixes vector
    spaces. Raises :class:`~skinflint.errors.UpstreamError` subclasses on failure.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        dim: int,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        post: Post | None = None,
    ) -> None:
        self.name = f"openai:{model}:{dim}"
        self.dim = dim
        self._url = base_url.rstrip("/") + "/embeddings"
        self._model = model
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._post: Post = post or (lambda url, h, body: _urllib_post(url, h, body, timeout))

    def embed(self, texts: list[str]) -> Vectors:
        """Unit vectors, one row per text, in order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        body = json.dumps({"model": self._model, "input": list(texts)}).encode()
        answer = self._post(self._url, self._headers, body)
        rows = _rows(answer, len(texts), self.dim)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return np.asarray(rows / np.maximum(norms, 1e-12), dtype=np.float32)


def _rows(answer: Any, count: int, dim: int) -> Vectors:
    """The ``data[*].embedding`` arrays in ``index`` order, checked for count and size."""
    try:
        data = sorted(answer["data"], key=lambda item: int(item["index"]))
        rows = np.asarray([item["embedding"] for item in data], dtype=np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamProtocolError(f"unreadable embeddings answer: {exc}") from exc
    if rows.shape != (count, dim):
        raise UpstreamProtocolError(
            f"expected {count} embeddings of {dim} dimensions, got shape {rows.shape}"
        )
    return rows


def _urllib_post(url: str, headers: dict[str, str], body: bytes, timeout: float) -> Any:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise UpstreamStatusError(exc.code, f"embeddings endpoint answered {exc.code}") from exc
    except TimeoutError as exc:
        raise UpstreamTimeoutError("embeddings endpoint timed out") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):  # a connect timeout arrives wrapped
            raise UpstreamTimeoutError("embeddings endpoint timed out") from exc
        raise UpstreamConnectionError(f"embeddings endpoint unreachable: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise UpstreamProtocolError("embeddings endpoint sent invalid JSON") from exc
