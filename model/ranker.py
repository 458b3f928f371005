"""The learned ranker over merged candidates: the features of a (reader, candidate) pair and the MLP.

The candidates of a reader are the union of three sources (the towers' top-N, the item graph's
top-N, the books of the reader's authors; ``model/candidates.py``). Each pair gets the features of
``FEATURES``; every source's score is looked up for every candidate (the towers' logit is exact for
any book, the graph's and the author source's are 0 where they have none), and a source's rank is
its position in that source's own list (``missing`` flags where the book is not in it). The MLP
scores the pairs; the recommender returns the top-k by that score. Training: ``train/ranking/``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from model.candidates import AuthorIndex, ItemGraph, RankedRows, drop_columns, history_matrix, sparse_lookup
from model.network import Int8Linear

FEATURES = (
    "towers_logit",
    "towers_rank",
    "towers_missing",
    "graph_score",  # divided by the reader's best graph score
    "graph_log_score",
    "graph_rank",
    "graph_missing",
    "author_rank",
    "author_missing",
    "author_overlap",  # share of the reader's history by the candidate's author
    "publisher_overlap",
    "predicted_rating",
    "log_popularity",
    "log_history",
    "year",
    "year_missing",
)
SOURCES = ("towers", "graph", "author")


class RankerMLP(nn.Module):
    """Standardised features -> hidden layers -> one score per pair (TorchScript-compatible).

    ``penalty`` times the book's log popularity is taken off the score: chosen on validation so
    that no single book heads too many readers' lists (``ranking.max_top1_share``); 0 by default.
    """

    def __init__(self, n_features: int, hidden: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.register_buffer("penalty", torch.zeros(()))
        self.popularity_at = FEATURES.index("log_popularity")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores [...] of features [..., F]."""
        return self.net((x - self.mean) / self.std).squeeze(-1) - self.penalty * x[..., self.popularity_at]

    def linears(self) -> list[nn.Module]:
        """The linear layers in order (what pruning and quantization walk)."""
        return [m for m in self.net if isinstance(m, (nn.Linear, Int8Linear))]

    def shape(self) -> list[int]:
        """Widths from the input through every layer, for reports."""
        layers = self.linears()
        return [int(layers[0].in_features), *(int(m.out_features) for m in layers)]


@dataclass(frozen=True)
class RankingSettings:
    """How many candidates each extra source adds, and whether the ranker orders the lists."""

    enabled: bool = True
    graph_candidates: int = 100
    author_candidates: int = 50
    per_author: int = 50

    def save(self, path: Path) -> None:
        """The settings file of a model folder (``layout.RANKING_SETTINGS``): these fields only."""
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> RankingSettings:
        meta = json.loads(path.read_text())
        return cls(
            bool(meta["enabled"]),
            int(meta["graph_candidates"]),
            int(meta["author_candidates"]),
            int(meta["per_author"]),
        )


@dataclass
class SourceScores:
    """What the extra sources say about a block of users, over catalog columns."""

    graph: RankedRows
    graph_best: np.ndarray  # [U] each user's largest graph score (0: none)
    author: RankedRows
    author_counts: sp.csr_matrix  # [U, A]
    publisher_counts: sp.csr_matrix  # [U, P]
    history_length: np.ndarray  # [U]


@dataclass
class MergedCandidates:
    """The union of the sources' candidates for a block of users, with every pair's features."""

    rows: torch.Tensor  # [U, M] book-set positions, -1 padding
    features: torch.Tensor  # [U, M, F]
    rating: torch.Tensor  # [U, M] predicted rating
    sources: np.ndarray  # [U, M, 3] bool: in the towers' / graph's / author source's own list


def book_years(years: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(year scaled to decades around 1990, missing flag): 0 or implausible years are missing."""
    y = np.asarray(years, np.float32)
    missing = (y < 1900) | (y > 2010)
    return np.where(missing, 0.0, (y - 1990.0) / 10.0).astype(np.float32), missing


class RankingStage:
    """The extra candidate sources and the ranker of one book set (catalog rows ``catalog_rows``)."""

    def __init__(
        self,
        graph: ItemGraph,
        authors: AuthorIndex,
        years: np.ndarray,
        settings: RankingSettings,
        ranker: torch.nn.Module | None,
        catalog_rows: np.ndarray | None = None,
        withdrawn: np.ndarray | None = None,
    ):
        """``withdrawn``: a bool per catalog row, True for a book no source may offer."""
        self.graph, self.authors, self.settings, self.ranker = graph, authors, settings, ranker
        self.withdrawn = withdrawn if withdrawn is not None and withdrawn.any() else None
        self.years = years
        n_catalog = graph.n_books
        self.catalog_rows = np.arange(n_catalog) if catalog_rows is None else np.asarray(catalog_rows, np.int64)
        self.position = np.full(n_catalog, -1, np.int64)
        inside = self.catalog_rows >= 0
        self.position[self.catalog_rows[inside]] = np.flatnonzero(inside)
        # the whole catalog in order (the sources' catalog rows are the set's positions)
        self.whole = len(self.catalog_rows) == n_catalog and bool((self.catalog_rows == np.arange(n_catalog)).all())
        keep = self.position >= 0
        if self.withdrawn is not None:
            keep &= ~self.withdrawn
        self.in_set = None if self.whole and self.withdrawn is None else keep

    def subset(self, rows: np.ndarray) -> RankingStage:
        """The same stage over the book-set positions ``rows`` only."""
        rows = np.asarray(rows, np.int64)
        return RankingStage(
            self.graph, self.authors, self.years, self.settings, self.ranker, self.catalog_rows[rows], self.withdrawn
        )

    def sources(self, history: list[np.ndarray], exclude: list[np.ndarray] | None) -> SourceScores:
        n_catalog = self.graph.n_books
        hist = history_matrix(history, n_catalog)
        excluded = None
        if exclude is not None and any(len(e) for e in exclude):
            cat = [self.catalog_rows[np.asarray(e, np.int64)] for e in exclude]
            excluded = history_matrix([c[c >= 0] for c in cat], n_catalog)
        graph = drop_columns(self.graph.scores(hist), excluded, self.in_set)
        author_counts, publisher_counts = self.authors.counts(hist)
        author = drop_columns(self.authors.scores(author_counts), excluded, self.in_set)
        best = np.asarray(graph.max(axis=1).todense()).ravel() if graph.shape[1] else np.zeros(len(history))
        return SourceScores(
            RankedRows.of(graph),
            best.astype(np.float32),
            RankedRows.of(author),
            author_counts,
            publisher_counts,
            np.diff(hist.indptr).astype(np.float32),
        )

    def extra_candidates(self, scores: SourceScores) -> torch.Tensor:
        """[U, graph + author candidates] book-set positions from the graph and author sources."""
        cols = np.concatenate(
            [scores.graph.top(self.settings.graph_candidates), scores.author.top(self.settings.author_candidates)],
            axis=1,
        )
        return torch.from_numpy(np.where(cols >= 0, self.position[np.maximum(cols, 0)], -1))

    def features(
        self,
        scores: SourceScores,
        rows: torch.Tensor,
        towers_logit: torch.Tensor,
        towers_rows: torch.Tensor,
        rating: torch.Tensor,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """([U, M, F] features, [U, M, 3] source membership) of the merged candidates ``rows``."""
        n_users, m = rows.shape
        towers_rank, in_towers = _rank_in(towers_rows, rows)
        n_towers = max(towers_rows.shape[1], 1)
        pos = rows.cpu().numpy().reshape(-1)
        user = np.repeat(np.arange(n_users), m)
        col = np.where(pos >= 0, self.catalog_rows[np.maximum(pos, 0)], -1)
        g_score, g_rank = scores.graph.lookup(user, col)
        _a_score, a_rank = scores.author.lookup(user, col)
        safe = np.maximum(col, 0)
        book_author = np.where(col >= 0, self.authors.author[safe], -1)
        book_pub = np.where(col >= 0, self.authors.publisher[safe], -1)
        a_count, _ = sparse_lookup(scores.author_counts, user, book_author)
        p_count, _ = sparse_lookup(scores.publisher_counts, user, book_pub)
        length = scores.history_length[user]
        popularity = np.where(col >= 0, self.authors.popularity[safe], 0)
        year, year_missing = book_years(np.where(col >= 0, self.years[safe], 0))
        best = scores.graph_best[user]
        n_graph, n_author = max(self.settings.graph_candidates, 1), max(self.settings.author_candidates, 1)
        t_rank = towers_rank.cpu().numpy().reshape(-1)
        columns = [
            towers_logit.float().cpu().numpy().reshape(-1),
            np.where(t_rank >= 0, np.log1p(np.maximum(t_rank, 0)) / math.log1p(n_towers), 1.0),
            t_rank < 0,
            np.where(best > 0, g_score / np.maximum(best, 1e-12), 0.0),
            np.log(g_score + 1e-6),
            np.where(g_rank >= 0, np.log1p(np.clip(g_rank, 0, 10 * n_graph)) / math.log1p(10 * n_graph), 1.0),
            g_rank < 0,
            np.where(a_rank >= 0, np.log1p(np.clip(a_rank, 0, 10 * n_author)) / math.log1p(10 * n_author), 1.0),
            a_rank < 0,
            a_count / np.maximum(length, 1),
            p_count / np.maximum(length, 1),
            rating.float().cpu().numpy().reshape(-1),
            np.log1p(popularity),
            np.log1p(length),
            year,
            year_missing,
        ]
        feats = np.stack([np.asarray(c, np.float32) for c in columns], axis=1).reshape(n_users, m, len(FEATURES))
        member = np.stack(
            [
                in_towers.cpu().numpy().reshape(-1),
                (g_rank >= 0) & (g_rank < n_graph),
                (a_rank >= 0) & (a_rank < n_author),
            ],
            axis=1,
        ).reshape(n_users, m, len(SOURCES))
        return torch.from_numpy(feats), member & (pos >= 0).reshape(n_users, m, 1)

    @torch.inference_mode()
    def score(self, features: torch.Tensor) -> torch.Tensor:
        if self.ranker is None:
            raise ValueError("this ranking stage has no trained ranker (the ranking step has not run)")
        device = next(iter(self.ranker.buffers())).device
        return self.ranker(features.to(device)).float()


def merge(*parts: torch.Tensor) -> torch.Tensor:
    """The union per row of [U, n_i] position tensors (-1 padding), sorted, repeats and padding at -1."""
    cat = torch.cat([p.to(parts[0].device) for p in parts], dim=1)
    # Padding sorts last: replace -1 by a large value, sort, mark repeats, restore -1.
    big = torch.iinfo(torch.int64).max
    ordered, _ = torch.sort(torch.where(cat < 0, big, cat), dim=1)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    ordered = ordered.masked_fill(repeat | (ordered == big), -1)
    # Valid ones first (stable), so the width can shrink to the longest row.
    key = (ordered < 0).to(torch.int8)
    order = torch.sort(key, dim=1, stable=True).indices
    ordered = ordered.gather(1, order)
    width = int((ordered >= 0).sum(1).max()) if ordered.numel() else 0
    return ordered[:, : max(width, 1)]


def _rank_in(lists: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank of each of ``values`` [U, M] in its row of ``lists`` [U, N] (-1: absent), found flag)."""
    if lists.shape[1] == 0:
        absent = torch.full(values.shape, -1, dtype=torch.long, device=values.device)
        return absent, absent >= 0
    big = torch.iinfo(torch.int64).max
    keyed = torch.where(lists < 0, big, lists)
    ordered, order = torch.sort(keyed, dim=1)
    at = torch.searchsorted(ordered, values.contiguous()).clamp_max(lists.shape[1] - 1)
    found = (ordered.gather(1, at) == values) & (values >= 0)
    rank = torch.where(found, order.gather(1, at), -1)
    return rank, found
