"""The recommender: the towers retrieve, candidate sources add, the learned ranker orders.

One class serves the handler's ``recommend``, the batch job's ``--mode topk`` and the evaluation,
so the three give the same lists. For a block of users:

1. user vectors from the retrieval towers (feature vector + the bag of books they read);
2. logits against every book vector of the book set (one matmul), read books masked, top-N; in
   bfloat16 where the hardware runs it natively, with a margin of extra candidates rescored
   exactly in fp32, so the order is the fp32 order of the rounded vectors. With a book index
   (``model/book_index.py``, large catalogs) the index proposes N + margin candidates instead, read
   books are dropped, and the rest are rescored the same way;
3. with the ranking stage (``RankingStage``, ``model/ranker.py``; the ``ranking`` step, on by
   default): the towers' top-N merged with the item graph's and the reader's authors' candidates,
   every pair featurised, relevance = the learned ranker's score;
4. without it: the rating MLP's predicted rating of the N pairs, relevance = retrieval logit +
   ``blend`` x predicted rating, with ``blend`` chosen on validation (``RetrievalSettings``).

The top-k by relevance are the answer, each with its predicted rating.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.book_index import BookIndex
from model.catalog import Catalog
from model.ranker import SOURCES, MergedCandidates, RankingStage, merge
from model.reasons import MAX_AUTHOR_BOOKS, Explainer, Reasons
from model.scoring import Scorer
from model.topk import exclusion_coords

# Most retrieval logits held at once (users x books slice): 2^24 floats = 64 MB.
LOGIT_BLOCK = 1 << 24
# Extra candidates the bf16 pass keeps (at least this many, or as many as asked) for the fp32 rescore:
# bf16 logits are rounded to ~0.4%, so near-ties may swap, never by dozens of places.
RESCORE_MARGIN = 32
PRECISIONS = ("auto", "fp32", "bf16")


def vector_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The retrieval matmul's dtype: "auto" is bf16 where oneDNN (CPU) or CUDA runs bf16 matmuls."""
    if precision not in PRECISIONS:
        raise ValueError(f"retrieval precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            native = device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        precision = "bf16" if native else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


@dataclass
class Candidates:
    """The retrieved top-N of a block of users, before the rerank."""

    rows: torch.Tensor  # [U, N] book-set positions, best retrieval first; -1 where fewer than N remain
    retrieval: torch.Tensor  # [U, N] retrieval logits (-inf at padding)
    rating: torch.Tensor  # [U, N] predicted ratings 1..10


@dataclass
class Recommendations:
    """Top-k per user after the rerank (padding: row -1, relevance -inf)."""

    rows: torch.Tensor  # [U, k]
    relevance: torch.Tensor  # [U, k] the rerank score the list is ordered by
    rating: torch.Tensor  # [U, k] predicted rating
    sources: np.ndarray | None = None  # [U, k, 3] bool, which sources listed each (None: the towers alone)


@dataclass(frozen=True)
class RetrievalSettings:
    """How many books the towers retrieve, in which precision, and how much the predicted rating
    weighs in the order without a ranking stage."""

    candidates: int = 200
    blend: float = 0.0
    precision: str = "auto"  # of the retrieval matmul (``vector_dtype``)

    def save(self, path: Path) -> None:
        """The settings file of a model folder (``layout.RETRIEVAL_SETTINGS``): these three only."""
        own = {"candidates": self.candidates, "blend": self.blend, "precision": self.precision}
        path.write_text(json.dumps(own, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> RetrievalSettings:
        meta = json.loads(path.read_text())
        return cls(int(meta["candidates"]), float(meta["blend"]), str(meta.get("precision", "auto")))


def embed_book_set(
    towers: torch.nn.Module, catalog: Catalog, feats: torch.Tensor, rows: torch.Tensor, batch: int = 65536
) -> torch.Tensor:
    """Unit vectors [B, dim] (CPU) of books from their feature vectors [B, book_dim] and catalog
    rows (-1: not in the catalog, so no id embedding), with the catalog's author and publisher codes."""
    device = towers.temperature.device
    inside = rows >= 0
    codes = [torch.where(inside, code[rows.clamp_min(0)], -1) for code in catalog.group_code_columns()]
    out = []
    with torch.inference_mode():
        for s in range(0, len(rows), batch):
            sl = slice(s, s + batch)
            parts = (feats[sl], rows[sl], codes[0][sl], codes[1][sl])
            out.append(towers.embed_books(*(x.to(device) for x in parts)).cpu())
    return torch.cat(out) if out else torch.zeros(0, int(towers.dim))


class Recommender:
    """Retrieval towers + book vectors of a book set, the ranking stage when the model has one, and the
    rating ``Scorer`` of the same set."""

    def __init__(
        self,
        towers: torch.nn.Module,
        book_vectors: torch.Tensor,
        scorer: Scorer,
        settings: RetrievalSettings,
        ranking: RankingStage | None = None,
        index: BookIndex | None = None,
        withdrawn: np.ndarray | None = None,
    ):
        """``index``: the book set's ``BookIndex`` (None: exhaustive search). ``withdrawn``: a bool per
        book of the set, True for a book never to recommend (out of print), on either search path."""
        if ranking is not None and len(ranking.catalog_rows) != book_vectors.shape[0]:
            raise ValueError(f"a ranking stage of {len(ranking.catalog_rows)} books for {book_vectors.shape[0]}")
        if book_vectors.shape[0] != scorer.n_books:
            raise ValueError(f"{book_vectors.shape[0]} book vectors for a book set of {scorer.n_books}")
        if index is not None and (index.n_books, index.dim) != tuple(book_vectors.shape):
            raise ValueError(
                f"a book index of {index.n_books} x {index.dim} for book vectors {tuple(book_vectors.shape)}"
            )
        self.device = scorer.device
        self.towers = towers.to(self.device).eval()
        self.dtype = vector_dtype(settings.precision, self.device)
        self.book_vectors = book_vectors.to(self.device, self.dtype).contiguous()
        self.temperature = float(self.towers.temperature)
        self.scorer = scorer
        self.settings = settings
        self.ranking = ranking
        self.index = index
        self.withdrawn = None if withdrawn is None else np.asarray(withdrawn, bool)
        blocked = np.flatnonzero(self.withdrawn) if self.withdrawn is not None else np.zeros(0, np.int64)
        self.blocked = torch.from_numpy(blocked).to(self.device) if len(blocked) else None
        self.last_timings: dict[str, float] = {}

    def subset(self, rows: np.ndarray) -> Recommender:
        """The same recommender over the book-set positions ``rows`` only (searched exhaustively: the
        index covers the whole book set)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        ranking = self.ranking.subset(rows) if self.ranking is not None else None
        withdrawn = self.withdrawn[np.asarray(rows, np.int64)] if self.withdrawn is not None else None
        return Recommender(
            self.towers,
            self.book_vectors[index],
            self.scorer.subset(index),
            self.settings,
            ranking,
            withdrawn=withdrawn,
        )

    @property
    def n_books(self) -> int:
        return int(self.book_vectors.shape[0])

    @torch.inference_mode()
    def user_vectors(self, user_feats: torch.Tensor, history: list[np.ndarray]) -> torch.Tensor:
        """Unit user vectors [U, dim]; ``history[i]`` holds catalog rows user i read."""
        lengths = [len(h) for h in history]
        flat = np.concatenate([np.asarray(h, np.int64) for h in history]) if sum(lengths) else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return self.towers.embed_users(
            user_feats.to(self.device),
            torch.from_numpy(flat).to(self.device),
            torch.from_numpy(offsets).to(self.device),
        )

    @torch.inference_mode()
    def candidates(
        self,
        user_feats: torch.Tensor,
        history: list[np.ndarray],
        exclude: list[np.ndarray] | None = None,
        n: int | None = None,
    ) -> Candidates:
        """Top-``n`` (default ``settings.candidates``) books per user by retrieval logit, read books
        (``exclude[i]``, book-set positions) left out, with the rating MLP's prediction of each."""
        start = time.perf_counter()
        n = min(n or self.settings.candidates, self.n_books)
        users = self.user_vectors(user_feats, history)
        top, rows = self._top_n(users, exclude, n)
        rows = rows.masked_fill(torch.isinf(top), -1)
        retrieved = time.perf_counter()
        user_proj = self.scorer.project_users(user_feats)
        rating = self.scorer.rate_rows(user_proj, rows.clamp_min(0))
        self.last_timings = {"retrieval": retrieved - start, "rerank": time.perf_counter() - retrieved}
        return Candidates(rows, top, rating)

    def _top_n(
        self, users: torch.Tensor, exclude: list[np.ndarray] | None, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``n`` logits and book-set positions per user, excluded books at -inf. The book set is
        scored in slices of at most ``LOGIT_BLOCK`` logits per call, each slice's top-n merged into
        the running one, so memory stays bounded whatever the catalog size and the user block.
        In bf16 a margin of extra candidates is kept and rescored in fp32 (``_rescore``). With a
        book index, its candidates instead (``_top_n_indexed``)."""
        return self._search(users / self.temperature, exclude, n)

    @torch.inference_mode()
    def nearest_books(self, vectors: torch.Tensor, exclude: list[np.ndarray] | None, n: int) -> np.ndarray:
        """Book-set positions [Q, n] of the ``n`` largest inner products with each query vector
        [Q, dim], best first (-1 where fewer remain): the retrieval's own search (the index or the
        exhaustive pass, rescored in fp32) for queries that are not readers, e.g. a book's vector
        for its similar books. ``exclude[i]``: positions never returned for query i."""
        n = min(n, self.n_books)
        top, rows = self._search(vectors.to(self.device).float(), exclude, n)
        return rows.masked_fill(torch.isinf(top), -1).cpu().numpy()

    def _search(
        self, users: torch.Tensor, exclude: list[np.ndarray] | None, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index is not None and 0 < n < self.n_books:
            return self._top_n_indexed(users, exclude, n)
        keep = n if self.dtype == torch.float32 else min(self.n_books, n + max(n, RESCORE_MARGIN))
        top, rows = self._top_pass(users.to(self.dtype), exclude, keep)
        if self.dtype == torch.float32:
            return top, rows
        return self._rescore(users, top, rows, n)

    def _top_n_indexed(
        self, users: torch.Tensor, exclude: list[np.ndarray] | None, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``n`` through the book index: ``n + margin`` candidates per user (withdrawn books
        skipped by the search itself), read books dropped, the rest rescored exactly (``_rescore``),
        so the order among the found books is exact. Users left with fewer than ``n`` (they read
        more of their candidates than the margin holds) are searched exhaustively."""
        assert self.index is not None
        n_users, n_books = users.shape[0], self.n_books
        search = min(n_books, n + self.index.settings.margin)
        blocked = self.blocked.cpu().numpy() if self.blocked is not None else None
        _, found = self.index.search(users, search, blocked)
        rows = torch.from_numpy(found).to(self.device)
        dropped = rows < 0
        if self.blocked is not None:  # the index skips them already; a withdrawn book must never pass
            dropped |= torch.isin(rows, self.blocked)
        n_open = torch.full((n_users,), n_books - (len(blocked) if blocked is not None else 0), device=self.device)
        if exclude is not None and any(len(e) for e in exclude):
            ex_user, ex_book = exclusion_coords(exclude, self.device)
            user = torch.arange(n_users, device=self.device).unsqueeze(1)
            dropped |= torch.isin(user * n_books + rows, ex_user * n_books + ex_book)
            open_read = ~torch.isin(ex_book, self.blocked) if self.blocked is not None else None
            n_open -= torch.bincount(ex_user if open_read is None else ex_user[open_read], minlength=n_users)
        top = torch.zeros(rows.shape, device=self.device).masked_fill(dropped, -math.inf)
        top, rows = self._rescore(users, top, rows.clamp_min(0), n)
        short = ((~torch.isinf(top)).sum(1) < torch.clamp(n_open, max=n)).nonzero().squeeze(1)
        if len(short):
            sub_exclude = [exclude[i] for i in short.tolist()] if exclude is not None else None
            keep = n if self.dtype == torch.float32 else min(n_books, n + max(n, RESCORE_MARGIN))
            part_top, part_rows = self._top_pass(users[short].to(self.dtype), sub_exclude, keep)
            if self.dtype != torch.float32:
                part_top, part_rows = self._rescore(users[short], part_top, part_rows, n)
            top[short], rows[short] = part_top, part_rows
        return top, rows

    def _rescore(
        self, users: torch.Tensor, top: torch.Tensor, rows: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-``n`` of the kept candidates by fp32 logits of the stored vectors, gathered for at
        most ``LOGIT_BLOCK`` vector elements at a time (a long candidate list must not copy the book set
        per user)."""
        exact = torch.empty(top.shape, dtype=torch.float32, device=self.device)
        step = max(1, LOGIT_BLOCK // max(rows.shape[1] * users.shape[1], 1))
        for begin in range(0, rows.shape[0], step):
            sl = slice(begin, begin + step)
            exact[sl] = torch.bmm(self.book_vectors[rows[sl]].float(), users[sl].unsqueeze(2)).squeeze(2)
        exact = exact.masked_fill(torch.isinf(top), -math.inf)
        top, pick = torch.topk(exact, min(n, exact.shape[1]), dim=1)
        return top, rows.gather(1, pick)

    def _top_pass(
        self, users: torch.Tensor, exclude: list[np.ndarray] | None, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_users, n_books = users.shape[0], self.n_books
        ex_user = ex_book = None
        if exclude is not None and any(len(e) for e in exclude):
            ex_user, ex_book = exclusion_coords(exclude, self.device)
        if n_books == 0 or n == 0:
            empty = torch.zeros(n_users, 0, device=self.device)
            return empty, empty.long()
        step = min(n_books, max(n, LOGIT_BLOCK // max(n_users, 1)))
        # One buffer for every slice: a fresh 64 MB tensor per slice costs its page faults each time.
        buffer = torch.empty(n_users * step, dtype=users.dtype, device=self.device)
        top = rows = None
        for begin in range(0, n_books, step):
            end = min(begin + step, n_books)
            logits = torch.mm(
                users, self.book_vectors[begin:end].t(), out=buffer[: n_users * (end - begin)].view(n_users, -1)
            )
            if ex_book is not None:
                inside = (ex_book >= begin) & (ex_book < end)
                logits[ex_user[inside], ex_book[inside] - begin] = -math.inf
            if self.blocked is not None:  # withdrawn books: for every user
                inside = self.blocked[(self.blocked >= begin) & (self.blocked < end)]
                logits[:, inside - begin] = -math.inf
            part_top, part_rows = torch.topk(logits, min(n, end - begin), dim=1)
            if top is None:
                top, rows = part_top, part_rows + begin
            else:
                merged, pick = torch.topk(torch.cat([top, part_top], dim=1), n, dim=1)
                rows = torch.cat([rows, part_rows + begin], dim=1).gather(1, pick)
                top = merged
        return top, rows

    def rerank(self, cands: Candidates, k: int, blend: float | None = None) -> Recommendations:
        """The top-``k`` of the candidates by retrieval logit + ``blend`` x predicted rating."""
        blend = self.settings.blend if blend is None else blend
        relevance = cands.retrieval + blend * cands.rating
        k = min(k, relevance.shape[1])
        relevance, order = torch.topk(relevance, k, dim=1)
        rows = cands.rows.gather(1, order).masked_fill(torch.isinf(relevance), -1)
        return Recommendations(rows, relevance, cands.rating.gather(1, order))

    def recommend(
        self,
        user_feats: torch.Tensor,
        history: list[np.ndarray],
        k: int,
        exclude: list[np.ndarray] | None = None,
    ) -> Recommendations:
        """Top-``k`` books per user: retrieval, then the rerank (the learned ranker over the merged
        candidates when the recommender has a ranking stage). With a blend of 0 and no ranking stage
        the rerank keeps the retrieval order, so only the ``k`` books returned are rated."""
        if self.ranking is not None and self.ranking.settings.enabled:
            return self.rank(self.merged_candidates(user_feats, history, exclude, k), k)
        n = max(k, self.settings.candidates) if self.settings.blend else k
        return self.rerank(self.candidates(user_feats, history, exclude, n), k)

    @torch.inference_mode()
    def merged_candidates(
        self,
        user_feats: torch.Tensor,
        history: list[np.ndarray],
        exclude: list[np.ndarray] | None = None,
        k: int = 0,
    ) -> MergedCandidates:
        """The towers' top-N (N = ``settings.candidates``, at least ``k``) united with the ranking
        stage's graph and author candidates, each pair with the ranker's features
        (``model/ranker.py``) and the predicted rating."""
        if self.ranking is None:
            raise ValueError("merged candidates need a ranking stage (the run's ranking step)")
        start = time.perf_counter()
        n = min(max(self.settings.candidates, k), self.n_books)
        users = self.user_vectors(user_feats, history)
        top, towers_rows = self._top_n(users, exclude, n)
        towers_rows = towers_rows.masked_fill(torch.isinf(top), -1)
        retrieved = time.perf_counter()
        scores = self.ranking.sources(history, exclude)
        rows = merge(towers_rows, self.ranking.extra_candidates(scores).to(self.device))
        sourced = time.perf_counter()
        safe = rows.clamp_min(0)
        logit = torch.bmm(self.book_vectors[safe].float(), (users / self.temperature).float().unsqueeze(2)).squeeze(2)
        rating = self.scorer.rate_rows(self.scorer.project_users(user_feats), safe)
        feats, member = self.ranking.features(scores, rows, logit, towers_rows, rating)
        self.last_timings = {
            "retrieval": retrieved - start,
            "sources": sourced - retrieved,
            "features": time.perf_counter() - sourced,
        }
        return MergedCandidates(rows, feats, rating, member)

    def rank(self, cands: MergedCandidates, k: int) -> Recommendations:
        """The top-``k`` of merged candidates by the ranker's score (padding last, at -inf)."""
        start = time.perf_counter()
        assert self.ranking is not None
        relevance = self.ranking.score(cands.features).to(self.device).masked_fill(cands.rows < 0, -math.inf)
        k = min(k, relevance.shape[1])
        relevance, order = torch.topk(relevance, k, dim=1)
        rows = cands.rows.gather(1, order).masked_fill(torch.isinf(relevance), -1)
        self.last_timings["rerank"] = time.perf_counter() - start
        sources = np.take_along_axis(cands.sources, order.cpu().numpy()[..., None], axis=1)
        return Recommendations(rows, relevance, cands.rating.gather(1, order), sources)

    @functools.cached_property
    def _explainer(self) -> Explainer | None:
        return Explainer(self.ranking.graph, self.ranking.authors) if self.ranking is not None else None

    def explain(self, history: list[np.ndarray], recs: Recommendations) -> Reasons:
        """The reasons of ``recs`` (``model/reasons.py``): the sources that listed each book and the
        reader's history books (catalog rows, ``history[u]``) behind graph and author candidates."""
        rows = recs.rows.cpu().numpy()
        sources = recs.sources
        if sources is None:  # no ranking stage: the towers alone retrieved the list
            sources = np.zeros((*rows.shape, len(SOURCES)), bool)
            sources[..., 0] = rows >= 0
        if self._explainer is None:
            none = np.full(rows.shape, -1, np.int64)
            return Reasons(sources, none, np.full((*rows.shape, MAX_AUTHOR_BOOKS), -1, np.int64))
        picks = np.where(rows >= 0, self.ranking.catalog_rows[np.maximum(rows, 0)], -1)
        return self._explainer.explain(history, picks, sources)
