"""Training the retrieval towers on who read what: in-batch sampled softmax with a logQ correction.

Each training interaction (user, book) is a positive; the other books of the batch are its
negatives. Popular books turn up as in-batch negatives more often than a uniform sample would have
them, so each logit is corrected by the log of the book's sampling probability (Yi et al. 2019,
"Sampling-bias-corrected neural modeling"). A book that appears twice in one batch is not its own
negative. The user's history bag leaves out the target book, and the feature rows are the
out-of-fold ones the rating MLP trains on, so no positive ever sees itself.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from model import layout
from model.artifacts import resolve_device
from model.book_index import BookIndex
from model.catalog import Catalog, save_array
from model.checkpoint import load_scripted
from model.features import book_own_stats
from model.recommend import Recommender, RetrievalSettings, embed_book_set
from model.scoring import Scorer
from train.config import IndexConfig, RetrievalConfig
from train.evaluation.protocols import warm_task
from train.evaluation.topk import choose_blend
from train.rating.dataset import TrainingData
from train.rating.fit import EarlyStopping
from train.retrieval.towers import TwoTower
from train.run_context import RunContext

log = logging.getLogger("bookrec.retrieval")


@dataclass
class Interactions:
    """Training interactions grouped by user (CSR over catalog rows) with their feature-table rows."""

    indptr: np.ndarray  # [n_users + 1]
    book: np.ndarray  # [N] catalog book row per interaction, grouped by user
    user: np.ndarray  # [N] catalog user row
    user_feat_row: np.ndarray  # [N] row in TrainingData.user_table
    book_feat_row: np.ndarray  # [N] row in TrainingData.book_table


def training_interactions(catalog: Catalog, data: TrainingData) -> Interactions:
    """Every training rating (out-of-fold feature rows) plus implicit reads (full-history rows)."""
    train = data.splits["train"]
    n_users, n_books = len(catalog.users), len(catalog.books)
    folds = data.user_table.shape[0] // n_users - 1
    u = (train.user_row % n_users).numpy()
    b = (train.book_row % n_books).numpy()
    uf, bf = train.user_row.numpy(), train.book_row.numpy()
    implicit = catalog.implicit_rows()
    if len(implicit[0]):
        iu, ib = implicit
        u, b = np.concatenate([u, iu]), np.concatenate([b, ib])
        uf = np.concatenate([uf, folds * n_users + iu])
        bf = np.concatenate([bf, folds * n_books + ib])
    order = np.argsort(u, kind="stable")
    indptr = np.searchsorted(u[order], np.arange(n_users + 1))
    return Interactions(indptr, b[order], u[order], uf[order], bf[order])


def sample_history(
    inter: Interactions, pairs: np.ndarray, max_items: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """History bags for a batch of interactions: up to ``max_items`` of the user's other books
    (all of them when they fit, else a uniform sample with replacement), never the target itself."""
    user = inter.user[pairs]
    start = inter.indptr[user]
    others = inter.indptr[user + 1] - start - 1
    target = pairs - start
    slot = np.arange(max_items)[None, :]
    exact = (others <= max_items)[:, None]
    drawn = (rng.random((len(pairs), max_items)) * np.maximum(others, 1)[:, None]).astype(np.int64)
    pick = np.where(exact, slot, drawn)
    valid = np.where(exact, slot < others[:, None], (others > 0)[:, None])
    pick = pick + (pick >= target[:, None])
    rows = inter.book[(start[:, None] + pick)[valid]]
    counts = valid.sum(1)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return torch.from_numpy(rows), torch.from_numpy(offsets)


@dataclass
class RetrievalFit:
    best_epoch: int
    best_val_recall: float
    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def new_retrieval_model(catalog: Catalog, cfg: RetrievalConfig) -> TwoTower:
    """Untrained towers sized for the catalog, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    return TwoTower(
        catalog.spec.user_dim,
        catalog.spec.book_dim,
        len(catalog.books),
        len(catalog.groups["author"][1]),
        len(catalog.groups["publisher"][1]),
        dim=cfg.dim,
        hidden=cfg.hidden,
        temperature=cfg.temperature,
    )


def catalog_book_vectors(model: TwoTower, catalog: Catalog) -> torch.Tensor:
    """Unit vectors [B, dim] of every catalog book (what the catalog ships precomputed)."""
    return embed_book_set(model, catalog, catalog.book_feats, torch.arange(len(catalog.books)))


def validation_recall(
    model: TwoTower, catalog: Catalog, data: TrainingData, inter: Interactions, k: int, max_users: int, seed: int
) -> float:
    """recall@k of the towers alone on (a seeded sample of) the validation users, ranking the
    whole catalog minus each user's training books."""
    val = data.splits["val"]
    n_users = len(catalog.users)
    vu = (val.user_row % n_users).numpy()
    vb = (val.book_row % len(catalog.books)).numpy()
    users = np.unique(vu)
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    device = model.temperature.device
    was_training = model.training
    model.eval()
    books = catalog_book_vectors(model, catalog).to(device)
    hits, total = 0.0, 0
    order = np.argsort(vu, kind="stable")
    vbounds = np.searchsorted(vu[order], np.arange(n_users + 1))
    # Users per block: at most 2^24 logits at once (1,024 users x 271k books would be 1.1 GB).
    step = max(1, min(1024, (1 << 24) // max(len(catalog.books), 1)))
    with torch.inference_mode():
        for s in range(0, len(users), step):
            block = users[s : s + step]
            hist = [inter.book[inter.indptr[u] : inter.indptr[u + 1]] for u in block]
            flat = torch.from_numpy(np.concatenate(hist)) if hist else torch.zeros(0, dtype=torch.long)
            offsets = torch.from_numpy(np.concatenate([[0], np.cumsum([len(h) for h in hist])[:-1]]))
            uvec = model.embed_users(catalog.user_feats[block].to(device), flat.to(device), offsets.to(device))
            scores = model.scores(uvec, books)
            rows = np.repeat(np.arange(len(block)), [len(h) for h in hist])
            scores[torch.from_numpy(rows).to(device), flat.to(device)] = -math.inf
            top = torch.topk(scores, k, dim=1).indices.cpu().numpy()
            for i, u in enumerate(block):
                truth = vb[order[vbounds[u] : vbounds[u + 1]]]
                hits += np.isin(truth, top[i]).sum() / len(truth)
                total += 1
    model.train(was_training)
    return hits / max(total, 1)


def as_new(feats: torch.Tensor, rows: torch.Tensor, own_stats: slice) -> torch.Tensor:
    """``feats`` with the book's own rating statistics of ``rows`` (a mask) zeroed, as a book nobody
    has rated has them: a book trained without its id must not be told apart by its own history,
    or the towers learn that unrated books are never read."""
    out = feats.clone()
    out[rows, own_stats] = 0.0
    return out


def _sampled_softmax_loss(
    model: TwoTower,
    uvec: torch.Tensor,
    book: torch.Tensor,
    book_feats: torch.Tensor,
    log_q: torch.Tensor,
    every_book: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    uniform: int,
    id_dropout: float,
    own_stats: slice,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Cross-entropy of each positive against the batch's other books and, with ``uniform`` > 0,
    a shared uniform sample of catalog books ("mixed negatives"). Each logit is corrected by the
    log of how often its book is expected among the negatives: ``B * p(book)`` in the batch,
    ``uniform / n_books`` in the uniform sample. A book that is the positive is never its own negative."""
    feats, rows, authors, publishers = every_book
    device = uvec.device
    # Dropping the id part at random teaches the content part to place books on its own.
    dropped = torch.from_numpy(rng.random(len(book)) < id_dropout)
    bvec = model.embed_books(
        as_new(book_feats.to(device), dropped.to(device), own_stats),
        torch.where(dropped, -1, book).to(device),
        authors[book.to(device)],
        publishers[book.to(device)],
    )
    logits = model.scores(uvec, bvec) - (log_q[book] + math.log(len(book))).to(device)[None, :]
    same = book[:, None] == book[None, :]
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same.to(device), -math.inf)
    if uniform > 0:
        extra = torch.from_numpy(rng.integers(0, len(rows), uniform))
        keep_id = torch.from_numpy(rng.random(uniform) >= id_dropout)
        evec = model.embed_books(
            as_new(feats[extra.to(device)], ~keep_id.to(device), own_stats),
            torch.where(keep_id, extra, -1).to(device),
            authors[extra.to(device)],
            publishers[extra.to(device)],
        )
        extra_logits = model.scores(uvec, evec) - math.log(uniform / len(rows))
        extra_logits = extra_logits.masked_fill((book[:, None] == extra[None, :]).to(device), -math.inf)
        logits = torch.cat([logits, extra_logits], dim=1)
    return F.cross_entropy(logits, torch.arange(len(book), device=device))


def _full_softmax_loss(
    model: TwoTower,
    uvec: torch.Tensor,
    book: torch.Tensor,
    every_book: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    id_dropout: float,
    own_stats: slice,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Cross-entropy of each positive against every catalog book. A random share of the books is
    embedded from content alone in each step, so the content part learns to place them too."""
    feats, rows, authors, publishers = every_book
    dropped = torch.from_numpy(rng.random(len(rows)) < id_dropout)
    bvec = model.embed_books(
        as_new(feats, dropped.to(feats.device), own_stats),
        torch.where(dropped, -1, rows).to(feats.device),
        authors,
        publishers,
    )
    return F.cross_entropy(model.scores(uvec, bvec), book.to(feats.device))


def fit_retrieval(
    model: TwoTower,
    catalog: Catalog,
    data: TrainingData,
    cfg: RetrievalConfig,
    progress: bool = True,
) -> RetrievalFit:
    """Train ``model`` in place; keeps the weights of the epoch with the best validation recall."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = model.temperature.device
    inter = training_interactions(catalog, data)
    n = len(inter.book)
    model.id_known.copy_(torch.from_numpy(np.bincount(inter.book, minlength=len(catalog.books)) > 0))
    model.set_standardisation(data.user_table, data.book_table)
    log_q = torch.from_numpy(np.log(np.bincount(inter.book, minlength=len(catalog.books)).clip(1) / max(n, 1)))
    if not cfg.logq_correction:
        log_q.zero_()
    authors, publishers = catalog.groups["author"][0], catalog.groups["publisher"][0]
    # Embedding tables take lazy Adam on the rows a step touched: a dense AdamW update of tables as
    # long as the catalog cost 1.2 s a step at 262k books (0.4 s at 34k), most of a step's time.
    tables = {id(p) for p in model.sparse_parameters()}
    optimizers = [
        torch.optim.AdamW(
            [p for p in model.parameters() if id(p) not in tables], lr=cfg.lr, weight_decay=cfg.weight_decay
        ),
        torch.optim.SparseAdam(model.sparse_parameters(), lr=cfg.lr),
    ]
    full = cfg.negatives == "full"
    own_stats = book_own_stats(catalog.spec)
    every_book = (
        catalog.book_feats.to(device),
        torch.arange(len(catalog.books)),
        authors.to(device),
        publishers.to(device),
    )

    result = RetrievalFit(0, -1.0)
    stopper = EarlyStopping(model, cfg.patience, higher_is_better=True)
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = rng.permutation(n)
        total, steps = 0.0, 0
        bar = tqdm(range(0, n, cfg.batch_size), desc=f"retrieval epoch {epoch}", leave=False, disable=not progress)
        for begin in bar:
            pairs = order[begin : begin + cfg.batch_size]
            if len(pairs) < 2:
                continue
            book = torch.from_numpy(inter.book[pairs])
            flat, offsets = sample_history(inter, pairs, cfg.history_samples, rng)
            uvec = model.embed_users(
                data.user_table[inter.user_feat_row[pairs]].to(device), flat.to(device), offsets.to(device)
            )
            if full:
                loss = _full_softmax_loss(model, uvec, book, every_book, cfg.id_dropout, own_stats, rng)
            else:
                loss = _sampled_softmax_loss(
                    model,
                    uvec,
                    book,
                    data.book_table[inter.book_feat_row[pairs]],
                    log_q,
                    every_book,
                    cfg.uniform_negatives if cfg.negatives == "mixed" else 0,
                    cfg.id_dropout,
                    own_stats,
                    rng,
                )
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            total += loss.item()
            steps += 1
        recall = validation_recall(model, catalog, data, inter, cfg.val_k, cfg.val_users, cfg.seed)
        row = {
            "epoch": epoch,
            "loss": total / max(steps, 1),
            f"val_recall@{cfg.val_k}": recall,
            "seconds": round(time.perf_counter() - start, 2),
        }
        result.epochs.append(row)
        log.info("retrieval epoch %d: loss %.4f, val recall@%d %.4f", epoch, row["loss"], cfg.val_k, recall)
        if stopper.update(recall, epoch):
            break
    stopper.restore()
    if stopper.best_epoch:
        result.best_val_recall, result.best_epoch = stopper.best, stopper.best_epoch
    result.seconds = time.perf_counter() - start
    return result


def save_book_index(run_dir: Path, vectors: torch.Tensor, cfg: IndexConfig) -> tuple[BookIndex | None, float]:
    """The book index of a catalog of at least ``cfg.threshold`` books, saved in the run folder, and
    its build time; below the threshold none (a stale one of an earlier run is removed)."""
    if len(vectors) < cfg.threshold:
        for name in layout.INDEX_FILES:
            (run_dir / name).unlink(missing_ok=True)
        return None, 0.0
    start = time.perf_counter()
    index = BookIndex.build(vectors.numpy(), cfg.settings())
    index.save(run_dir / layout.BOOK_INDEX, run_dir / layout.BOOK_INDEX_SETTINGS)
    seconds = time.perf_counter() - start
    log.info("retrieval: %s index of %d books built in %.1f s", index.settings.kind, len(vectors), seconds)
    return index, seconds


def step_retrieval(run: RunContext, progress: bool = True) -> dict:
    """Train the towers, ship them scripted with the catalog's book vectors, and choose the rerank
    blend on validation with the shipped rating model; the settings go to ``retrieval_settings.json``,
    the report to ``retrieval.json``."""
    cfg, run_dir = run.cfg, run.dir
    torch.manual_seed(cfg.retrieval.seed)
    catalog, ratings, data = run.catalog(), run.ratings(), run.training_data()
    device = resolve_device(cfg.train.device)
    model = new_retrieval_model(catalog, cfg.retrieval).to(device)
    result = fit_retrieval(model, catalog, data, cfg.retrieval, progress)
    model.cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(run_dir / layout.RETRIEVAL_FILE))
    # Scored from here on as served: the scripted file read back.
    towers = load_scripted(run_dir / layout.RETRIEVAL_FILE)
    vectors = catalog_book_vectors(towers, catalog)
    save_array(run_dir / layout.BOOK_VECTORS, vectors.numpy())
    index, index_seconds = save_book_index(run_dir, vectors, cfg.retrieval.index)
    run.keep("towers", towers)
    run.keep("book_vectors", vectors)
    run.keep("book_index", index)

    # The blend is chosen with the recommender in memory: the shipped rating model over the catalog,
    # these towers, vectors and index, the configured candidates and precision (no ranking stage);
    # ``choose_blend`` tries every blend of the grid.
    scorer = Scorer(run.folder.load_rating_model(), catalog.book_feats, torch.device("cpu"))
    unblended = RetrievalSettings(cfg.retrieval.candidates, precision=cfg.retrieval.precision)
    blend, blend_table = choose_blend(
        Recommender(towers, vectors, scorer, unblended, index=index),
        warm_task(catalog, ratings, "val"),
        cfg.retrieval.blend_grid,
        min_gain=cfg.retrieval.blend_min_gain,
    )
    settings = RetrievalSettings(cfg.retrieval.candidates, blend, cfg.retrieval.precision)
    settings.save(run_dir / layout.RETRIEVAL_SETTINGS)
    run.keep("retrieval_settings", settings)
    summary = {
        "blend": blend,
        "best_epoch": result.best_epoch,
        f"best_val_recall@{cfg.retrieval.val_k}": round(result.best_val_recall, 5),
        "epochs": result.epochs,
        "seconds": round(result.seconds, 1),
        "val_recall@10_by_blend": blend_table,
        "device": str(device),
        "index": None if index is None else {"kind": index.settings.kind, "build_seconds": round(index_seconds, 1)},
    }
    run.write_report(layout.RETRIEVAL_REPORT, summary)
    log.info("retrieval: best epoch %d, blend %g (val recall@10 by blend %s)", result.best_epoch, blend, blend_table)
    return {k: v for k, v in summary.items() if k != "epochs"}
