"""The ranker's training data and fit: merged candidates of val readers, labelled by their val reads.

The candidate sources were fitted on the training history (the catalog's), so a val read among a
reader's candidates is a read no source has seen: a fair label. Each reader's candidates are one
list; the loss is listwise (softmax cross-entropy of the list, averaged over its read books), and
readers with no read among their candidates teach nothing and are skipped in the fit (they still
count, as misses, in every recall).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from model.ranker import FEATURES, SOURCES, RankerMLP
from model.recommend import Recommender
from train.config import RankingConfig
from train.metrics import ndcg_at_k_binary, recall_at_k, top1_share
from train.rating.fit import EarlyStopping

log = logging.getLogger("bookrec.ranking")

USER_BLOCK = 512


@dataclass
class RankingData:
    """Featurised candidate lists of a set of readers (padded to one width)."""

    rows: np.ndarray  # [U, M] book-set positions, -1 padding
    features: torch.Tensor  # [U, M, F]
    member: np.ndarray  # [U, M, 3] in each source's own list
    label: np.ndarray  # [U, M] a val read
    relevant: list[np.ndarray]  # each reader's val reads (all of them, found or not)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, index: np.ndarray) -> RankingData:
        return RankingData(
            self.rows[index],
            self.features[torch.from_numpy(index)],
            self.member[index],
            self.label[index],
            [self.relevant[i] for i in index],
        )


def collect(
    recommender: Recommender,
    feats: torch.Tensor,
    history: list[np.ndarray],
    relevant: list[np.ndarray],
    progress_every: int = 20,
) -> RankingData:
    """Merged candidates and features of every reader, block by block (the serving code path)."""
    blocks = []
    start = time.perf_counter()
    for n, s in enumerate(range(0, len(history), USER_BLOCK)):
        sl = slice(s, s + USER_BLOCK)
        cands = recommender.merged_candidates(feats[sl], history[sl], history[sl])
        blocks.append((cands.rows.cpu().numpy(), cands.features, cands.sources))
        if n % progress_every == 0:
            log.info("ranking features: %d / %d readers (%.0f s)", s, len(history), time.perf_counter() - start)
    width = max(b[0].shape[1] for b in blocks)
    rows = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=-1) for r, _, _ in blocks])
    features = torch.cat([F.pad(f, (0, 0, 0, width - f.shape[1])) for _, f, _ in blocks])
    member = np.concatenate([np.pad(m, ((0, 0), (0, width - m.shape[1]), (0, 0))) for _, _, m in blocks])
    label = np.zeros(rows.shape, bool)
    for i, truth in enumerate(relevant):
        label[i] = np.isin(rows[i], truth) & (rows[i] >= 0)
    return RankingData(rows, features, member, label, relevant)


def top_k(data: RankingData, scores: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    """[U, k] positions by ``scores`` [U, M] (padding never chosen; -1 where a list is shorter)."""
    s = torch.as_tensor(np.asarray(scores, np.float32)).masked_fill(torch.from_numpy(data.rows < 0), -np.inf)
    value, order = torch.topk(s, min(k, s.shape[1]), dim=1)
    out = np.take_along_axis(data.rows, order.numpy(), axis=1)
    return np.where(np.isinf(value.numpy()), -1, out)


def quality(data: RankingData, scores: torch.Tensor | np.ndarray, k: int = 10) -> dict[str, float]:
    top = top_k(data, scores, k)
    return {
        f"recall@{k}": round(recall_at_k(top, data.relevant, k), 5),
        f"ndcg@{k}": round(ndcg_at_k_binary(top, data.relevant, k), 5),
        "top1_share": round(top1_share(top), 5),
    }


def towers_scores(data: RankingData) -> np.ndarray:
    """The towers' own order (their logit, books outside their top-N last): the path without ranker."""
    logit = data.features[..., FEATURES.index("towers_logit")].numpy()
    return np.where(data.member[..., 0], logit, -1e9 + logit)


def source_recall(data: RankingData) -> dict[str, float]:
    """Share of the val reads found in each source's list and in the union (the ceiling of any order)."""
    total = sum(len(r) for r in data.relevant) or 1
    out = {name: float((data.label & data.member[..., i]).sum() / total) for i, name in enumerate(SOURCES)}
    out["union"] = float(data.label.sum() / total)
    return {k: round(v, 5) for k, v in out.items()}


def fit_ranker(
    fit: RankingData,
    stop: RankingData,
    cfg: RankingConfig,
    drop: tuple[str, ...] = (),
    start: RankerMLP | None = None,
    epochs: int | None = None,
    lr: float | None = None,
) -> tuple[RankerMLP, dict]:
    """A ranker trained on ``fit``, the epoch with the best ``stop`` recall@10 kept. ``drop`` names
    features held constant (ablation); ``start`` continues from a model (the pruned one's recovery)
    instead of a fresh one, for ``epochs`` at ``lr`` (default: the config's)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    useful = np.flatnonzero(fit.label.any(1))
    valid = torch.from_numpy(fit.rows >= 0)
    if start is None:
        model = RankerMLP(len(FEATURES), cfg.hidden)
        flat = fit.features[valid]
        model.mean.copy_(flat.mean(0))
        model.std.copy_(flat.std(0).clamp_min(1e-6))
    else:
        model = start
    dropped = [FEATURES.index(name) for name in drop]

    def masked(x: torch.Tensor) -> torch.Tensor:
        if not dropped:
            return x
        x = x.clone()
        x[..., dropped] = model.mean[dropped]
        return x

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr or cfg.lr, weight_decay=cfg.weight_decay)
    stopper = EarlyStopping(model, cfg.patience, higher_is_better=True)
    label = torch.from_numpy(fit.label)
    history = []
    if start is not None:  # the starting point counts: recovery epochs that do not help are undone
        model.eval()
        with torch.no_grad():
            history.append({"epoch": 0, **quality(stop, model(masked(stop.features)))})
        stopper.update(history[0]["recall@10"], 0)
    for epoch in range(1, (epochs or cfg.epochs) + 1):
        model.train()
        order = rng.permutation(useful)
        total = 0.0
        for s in range(0, len(order), cfg.batch_users):
            idx = torch.from_numpy(order[s : s + cfg.batch_users])
            logits = model(masked(fit.features[idx])).masked_fill(~valid[idx], -1e9)
            logp = F.log_softmax(logits, dim=1)
            y = label[idx].float()
            loss = -((logp * y).sum(1) / y.sum(1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            score = quality(stop, model(masked(stop.features)))
        history.append({"epoch": epoch, "loss": round(total / max(len(useful), 1), 5), **score})
        log.info("ranker epoch %d: %s", epoch, history[-1])
        if stopper.update(score["recall@10"], epoch):
            break
    stopper.restore()
    model.eval()
    if dropped:  # the ablated features are constants: fold them into the standardisation
        model.std[dropped] = float("inf")
    return model, {"best_epoch": stopper.best_epoch, "epochs": history}
