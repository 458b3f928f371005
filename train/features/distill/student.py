"""The BERT-tiny student: built from a config and vocabulary, started from the teacher, trained by MSE.

The target of a text is the teacher's L2-normalised sentence embedding projected onto its first
``dim`` principal components (fitted on the training texts) and scaled to unit variance per
component, so the student's width stays BERT-tiny's and every component counts alike.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from model.encoder import TextEncoder
from train.config import DistillConfig
from train.features.encoders import BERT_TINY, bert_tokenizer


@dataclass
class Projection:
    """Teacher space -> target space: centre, project on the top components, scale."""

    mean: np.ndarray  # [teacher_dim]
    components: np.ndarray  # [dim, teacher_dim], orthonormal rows
    scale: float
    explained: float  # share of the teacher embeddings' variance the components keep

    @classmethod
    def fit(cls, teacher: np.ndarray, dim: int) -> Projection:
        unit = _normalise(teacher)
        mean = unit.mean(0)
        _, s, vt = np.linalg.svd(unit - mean, full_matrices=False)
        coords = (unit - mean) @ vt[:dim].T
        explained = float((s[:dim] ** 2).sum() / (s**2).sum())
        return cls(mean, vt[:dim].astype(np.float32), float(1.0 / coords.std()), explained)

    def target(self, teacher: np.ndarray) -> np.ndarray:
        return ((_normalise(teacher) - self.mean) @ self.components.T * self.scale).astype(np.float32)

    def back(self, student: np.ndarray) -> np.ndarray:
        """A student embedding mapped back into the teacher's (normalised) space."""
        return student / self.scale @ self.components + self.mean


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two embedding matrices."""
    return (_normalise(a) * _normalise(b)).sum(1)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(cosines(a, b).mean())


def build_student(cfg: DistillConfig, teacher: TextEncoder, max_length: int, pooling: str) -> TextEncoder:
    """A randomly initialised BERT-tiny with ``cfg.student_config_dir``'s shape and vocabulary
    (none: BERT-tiny's shape and the teacher's tokenizer)."""
    from transformers import BertConfig, BertModel

    params = dict(BERT_TINY)
    if cfg.student_config_dir:
        folder = Path(cfg.student_config_dir)
        tokens = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
        tokenizer = bert_tokenizer({token: i for i, token in enumerate(tokens)})
        if (folder / "config.json").is_file():
            base = BertConfig.from_json_file(str(folder / "config.json")).to_dict()
            params.update({k: v for k, v in base.items() if k in BERT_TINY})
    else:
        tokenizer = teacher.tokenizer
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = BertModel(config, add_pooling_layer=False)
    return TextEncoder(tokenizer, model, pooling, max_length, "student")


@torch.no_grad()
def init_from_teacher(student: TextEncoder, teacher: TextEncoder, projection: Projection) -> int:
    """Start the student's word and position embeddings from the teacher's, projected to its width.

    Tokens are matched by their string, so any shared vocabulary works; returns how many matched.
    Rows are rescaled to the student's own initial spread, which its LayerNorm expects."""
    t_emb = teacher.model.embeddings
    s_emb = student.model.embeddings
    comps = torch.from_numpy(projection.components)  # [dim, teacher_dim]
    teacher_vocab = teacher.tokenizer.get_vocab()
    pairs = [(s_id, teacher_vocab[tok]) for tok, s_id in student.tokenizer.get_vocab().items() if tok in teacher_vocab]
    if not pairs or comps.shape[0] != s_emb.word_embeddings.weight.shape[1]:
        return 0
    s_ids, t_ids = (torch.tensor(ids) for ids in zip(*pairs, strict=True))
    for t_table, s_table, rows in (
        (t_emb.word_embeddings.weight, s_emb.word_embeddings.weight, (s_ids, t_ids)),
        (t_emb.position_embeddings.weight, s_emb.position_embeddings.weight, None),
    ):
        projected = (t_table.float() - t_table.float().mean(0)) @ comps.T
        projected *= s_table.std() / projected.std().clamp_min(1e-12)
        if rows is None:
            n = min(len(s_table), len(projected))
            s_table[:n] = projected[:n]
        else:
            s_table[rows[0]] = projected[rows[1]]
    return len(pairs)


POOL_BATCHES = 50


def _length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of texts of similar length (less padding), in shuffled order.

    Texts are shuffled, cut into pools of ``POOL_BATCHES`` batches, sorted by length within a pool
    and batched."""
    order = rng.permutation(len(lengths))
    pool = batch_size * POOL_BATCHES
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class FitResult:
    epochs: list[dict]
    seconds: float
    texts_per_s: float


def fit_student(
    student: TextEncoder,
    texts: list[str],
    targets: np.ndarray,
    cfg: DistillConfig,
    device: torch.device,
    progress: bool = True,
) -> FitResult:
    """MSE between the student's pooled embedding and the target, AdamW with warm-up then cosine decay."""
    model = student.model.to(device).train()
    target = torch.from_numpy(targets)
    pool = cfg.batch_size * POOL_BATCHES
    full, rest = divmod(len(texts), pool)
    total = (full * POOL_BATCHES + math.ceil(rest / cfg.batch_size)) * cfg.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)),
    )
    rng = np.random.default_rng(cfg.seed)
    lengths = np.array([len(t) for t in texts])
    bar = tqdm(total=total, desc="distill", unit="step", disable=not progress)
    epochs, start = [], time.perf_counter()
    for epoch in range(cfg.epochs):
        loss_sum = 0.0
        for idx in _length_bucketed_batches(lengths, cfg.batch_size, rng):
            pred = student.encode([texts[j] for j in idx])
            loss = torch.nn.functional.mse_loss(pred, target[idx].to(device))
            loss_sum += float(loss.detach()) * len(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
        epochs.append({"epoch": epoch + 1, "train_mse": round(loss_sum / len(texts), 5)})
        bar.set_postfix(mse=epochs[-1]["train_mse"])
    bar.close()
    model.eval().cpu()
    seconds = time.perf_counter() - start
    return FitResult(epochs, seconds, len(texts) * cfg.epochs / max(seconds, 1e-9))
