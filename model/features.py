"""Feature vectors of users and books, from text embeddings and rating history.

One function builds each side for every caller: training (out-of-fold histories), evaluation,
the TorchServe handler (known users, or a new user's few ratings) and the Beam scorer.

User vector = [text embedding | taste profile | history stats]
Book vector = [text embedding | history stats | author stats | publisher stats]

The taste profile is the mean of the rated books' text embeddings weighted by how far each rating
sits from the global mean, shrunk towards zero for short histories. History stats are
log-count, shrunk mean deviation from the global mean, and a has-history flag. Author and
publisher stats pool the ratings of the *other* books by the same author (publisher), so a
book never seen in training gets the same kind of evidence as a known one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

N_STATS = 3


@dataclass(frozen=True)
class FeatureSpec:
    """Constants the features depend on, fixed at training time and shipped with the model."""

    emb_dim: int
    global_mean: float
    shrinkage: float

    @property
    def user_dim(self) -> int:
        return 2 * self.emb_dim + N_STATS

    @property
    def book_dim(self) -> int:
        return self.emb_dim + 3 * N_STATS

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> FeatureSpec:
        return cls(**json.loads(path.read_text()))


def book_own_stats(spec: FeatureSpec) -> slice:
    """Columns of a book vector that hold the book's own rating statistics (zero when unrated)."""
    return slice(spec.emb_dim, spec.emb_dim + N_STATS)


def history_stats(count: torch.Tensor, total: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """[N, 3] stats from rating counts and sums: log-count, shrunk mean deviation, has-history."""
    count = count.to(torch.float32)
    deviation = (total.to(torch.float32) - count * spec.global_mean) / (count + spec.shrinkage)
    return torch.stack([torch.log1p(count), deviation, (count > 0).to(torch.float32)], dim=1)


def book_features(
    text_emb: torch.Tensor,
    count: torch.Tensor,
    total: torch.Tensor,
    author_count: torch.Tensor,
    author_total: torch.Tensor,
    publisher_count: torch.Tensor,
    publisher_total: torch.Tensor,
    spec: FeatureSpec,
) -> torch.Tensor:
    """[N, book_dim] book vectors from text embeddings and rating counts/sums of the book itself
    and of the other books by its author and publisher."""
    return torch.cat(
        [
            text_emb.to(torch.float32),
            history_stats(count, total, spec),
            history_stats(author_count, author_total, spec),
            history_stats(publisher_count, publisher_total, spec),
        ],
        dim=1,
    )


def user_features(
    text_emb: torch.Tensor,
    hist_user: torch.Tensor,
    hist_book_emb: torch.Tensor,
    hist_rating: torch.Tensor,
    spec: FeatureSpec,
) -> torch.Tensor:
    """[N, user_dim] user vectors.

    ``text_emb`` is [N, emb_dim]; the history is a flat list of ratings: ``hist_user`` [M] (row in
    ``text_emb``), ``hist_book_emb`` [M, emb_dim] (text embedding of the rated book) and
    ``hist_rating`` [M]. Users with no history get a zero profile.
    """
    n = text_emb.shape[0]
    hist_user = hist_user.to(torch.long)
    rating = hist_rating.to(torch.float32)
    count = torch.zeros(n).index_add_(0, hist_user, torch.ones_like(rating))
    total = torch.zeros(n).index_add_(0, hist_user, rating)
    weighted = hist_book_emb.to(torch.float32) * (rating - spec.global_mean).unsqueeze(1)
    profile = torch.zeros(n, spec.emb_dim).index_add_(0, hist_user, weighted)
    profile = profile / (count + spec.shrinkage).unsqueeze(1)
    return torch.cat([text_emb.to(torch.float32), profile, history_stats(count, total, spec)], dim=1)


def book_history(book_index: torch.Tensor, rating: torch.Tensor, n_books: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-book rating counts and sums from a flat list of (book row, rating)."""
    book_index = book_index.to(torch.long)
    rating = rating.to(torch.float32)
    count = torch.zeros(n_books).index_add_(0, book_index, torch.ones_like(rating))
    total = torch.zeros(n_books).index_add_(0, book_index, rating)
    return count, total


def group_totals(
    group: torch.Tensor, count: torch.Tensor, total: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sums of per-book counts and totals; ``group`` is -1 for books with no group."""
    known = group >= 0
    g_count = torch.zeros(n_groups).index_add_(0, group[known], count[known])
    g_total = torch.zeros(n_groups).index_add_(0, group[known], total[known])
    return g_count, g_total


def others_in_group(
    group: torch.Tensor,
    count: torch.Tensor,
    total: torch.Tensor,
    g_count: torch.Tensor,
    g_total: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and sums of the *other* books in each book's group (zero without a group)."""
    known = group >= 0
    safe = group.clamp_min(0)
    other_count = torch.where(known, g_count[safe] - count, torch.zeros_like(count))
    other_total = torch.where(known, g_total[safe] - total, torch.zeros_like(total))
    return other_count, other_total


def book_feature_table(
    text_emb: torch.Tensor,
    author: torch.Tensor,
    publisher: torch.Tensor,
    hist_book: torch.Tensor,
    hist_rating: torch.Tensor,
    spec: FeatureSpec,
) -> torch.Tensor:
    """Feature vectors of every catalog book from a flat rating history.

    ``author`` / ``publisher`` are group codes per book (-1 when unknown).
    """
    n = text_emb.shape[0]
    count, total = book_history(hist_book, hist_rating, n)
    groups = []
    for code in (author, publisher):
        g_count, g_total = group_totals(code, count, total, int(code.max().item()) + 1 if n else 0)
        groups.extend(others_in_group(code, count, total, g_count, g_total))
    return book_features(text_emb, count, total, *groups, spec)
