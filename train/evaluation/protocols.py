"""Top-K protocols: which users rank which books, with what history, against what truth.

- **warm**: every user with warm-test ratings; rank the whole catalog minus the user's training
  books; relevant = the user's test books, liked = those rated 8 or more.
- **cold-user**: every cold-test user, given as a new user of a request would be: location and
  age, plus up to ``reveal`` of their ratings (a seeded choice that leaves at least one held out);
  rank the catalog minus the revealed books; relevant = the rest.
- **cold-book**: every user with cold-book test ratings ranks only the cold books (read by nobody
  in training): among new arrivals, do the ones this reader read come first?
- **new-author**: the cold-book protocol restricted to the cold books whose author has no book in
  training (only text, publisher and year can place them), and to the readers who read one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from model.catalog import Catalog
from train.data.tables import cold_test_books

LIKED = 8.0


@dataclass
class RankingTask:
    """Users to rank for, what each brings as history, what they may not get, and the truth."""

    name: str
    users: np.ndarray  # catalog user rows
    feats: torch.Tensor  # [U, user_dim] feature vectors (as a request would produce them)
    history: list[np.ndarray]  # catalog book rows fed to the model as the reader's history
    exclude: list[np.ndarray]  # catalog book rows not to recommend
    relevant: list[np.ndarray]
    liked: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.users)


def _grouped(users: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> list[np.ndarray]:
    """``values`` grouped by ``users``, one array per entry of ``wanted`` (empty when absent)."""
    order = np.argsort(users, kind="stable")
    bounds = np.searchsorted(users[order], np.concatenate([wanted, wanted + 1]))
    lo, hi = bounds[: len(wanted)], bounds[len(wanted) :]
    sorted_values = values[order]
    return [sorted_values[a:b] for a, b in zip(lo, hi, strict=True)]


def _rows(catalog: Catalog, part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    users = part["user_id"].map(catalog.user_index).to_numpy(np.int64)
    books = part["isbn"].map(catalog.book_index).to_numpy(np.int64)
    return users, books, part["rating"].to_numpy(np.float32)


def warm_task(catalog: Catalog, ratings: pd.DataFrame, split: str = "test") -> RankingTask:
    """Users with ratings in ``split`` (test or val), their training history, the whole catalog."""
    users, books, rating = _rows(catalog, ratings[ratings["split"] == split])
    wanted = np.unique(users)
    history = [catalog.rated_by(int(u)) for u in wanted]
    return RankingTask(
        name="warm" if split == "test" else split,
        users=wanted,
        feats=catalog.user_feats[torch.from_numpy(wanted)],
        history=history,
        exclude=history,
        relevant=_grouped(users, books, wanted),
        liked=_grouped(users, np.where(rating >= LIKED, books, -1), wanted),
    )


def cold_user_task(catalog: Catalog, ratings: pd.DataFrame, reveal: int, seed: int) -> RankingTask:
    """Cold-test users as new users: text (location, age) plus up to ``reveal`` revealed ratings."""
    part = ratings[ratings["split"] == "cold_user"]
    users, books, rating = _rows(catalog, part)
    wanted = np.unique(users)
    rng = np.random.default_rng(seed)
    per_books, per_ratings = _grouped(users, books, wanted), _grouped(users, rating, wanted)
    shown, hidden, liked, hist_user, hist_rating = [], [], [], [], []
    for n, (b, r) in enumerate(zip(per_books, per_ratings, strict=True)):
        order = rng.permutation(len(b))
        m = min(reveal, len(b) - 1)
        shown.append(b[order[:m]])
        hidden.append(b[order[m:]])
        liked.append(b[order[m:]][r[order[m:]] >= LIKED])
        hist_user.extend([n] * m)
        hist_rating.extend(r[order[:m]].tolist())
    flat = np.concatenate(shown) if shown else np.zeros(0, np.int64)
    feats = catalog.new_user_features(
        catalog.user_emb[torch.from_numpy(wanted)],
        torch.tensor(hist_user, dtype=torch.long),
        catalog.books["isbn"].to_numpy()[flat].tolist(),
        torch.tensor(hist_rating, dtype=torch.float32),
    )
    return RankingTask("cold-user", wanted, feats, shown, shown, hidden, [x[x >= 0] for x in liked])


def cold_book_task(
    catalog: Catalog, ratings: pd.DataFrame, new_authors_only: bool = False
) -> tuple[RankingTask, np.ndarray]:
    """Warm users with cold-book test ratings, and the cold books (catalog rows) they rank among.

    ``new_authors_only``: only the cold books whose author has no book in the training history
    (or no author at all), so only their text, publisher and year can place them; readers with
    none of those among their cold-book reads are left out."""
    cold_books = cold_test_books(ratings)
    candidates = np.sort(pd.Series(cold_books).map(catalog.book_index).to_numpy(np.int64))
    if new_authors_only:
        candidates = candidates[new_author_books(catalog)[candidates]]
    users, books, rating = _rows(catalog, ratings[ratings["split"] == "cold_book"])
    wanted = np.unique(users)
    position = np.full(len(catalog.books), -1, np.int64)
    position[candidates] = np.arange(len(candidates))
    history = [catalog.rated_by(int(u)) for u in wanted]
    relevant = [position[b] for b in _grouped(users, books, wanted)]
    liked = [position[b] for b in _grouped(users[rating >= LIKED], books[rating >= LIKED], wanted)]
    if new_authors_only:  # readers with a cold-book read among these candidates
        keep = np.flatnonzero([np.any(r >= 0) for r in relevant])
        wanted, history = wanted[keep], [history[i] for i in keep]
        relevant, liked = [relevant[i][relevant[i] >= 0] for i in keep], [liked[i] for i in keep]
    task = RankingTask(
        name="new-author" if new_authors_only else "cold-book",
        users=wanted,
        feats=catalog.user_feats[torch.from_numpy(wanted)],
        history=history,
        exclude=[np.zeros(0, np.int64)] * len(wanted),
        relevant=relevant,
        liked=[x[x >= 0] for x in liked],
    )
    return task, candidates


def new_author_books(catalog: Catalog) -> np.ndarray:
    """bool per catalog book: its author (``model.text.group_key`` of it) has no book in the
    training history, or it has no author."""
    authors = catalog.group_code_columns()[0].numpy()
    read = catalog.rated_books
    known = np.zeros(int(authors.max(initial=-1)) + 1, bool)
    known[authors[read][authors[read] >= 0]] = True
    return (authors < 0) | ~known[np.maximum(authors, 0)]


def sample_task(task: RankingTask, max_users: int, seed: int) -> RankingTask:
    """``task`` restricted to a seeded sample of ``max_users`` users (itself when it has no more)."""
    if len(task) <= max_users:
        return task
    return restrict_task(task, np.sort(np.random.default_rng(seed).choice(len(task), max_users, replace=False)))


def restrict_task(task: RankingTask, keep: np.ndarray) -> RankingTask:
    """``task`` for its users at positions ``keep`` only."""
    return RankingTask(
        name=task.name,
        users=task.users[keep],
        feats=task.feats[torch.from_numpy(keep)],
        history=[task.history[i] for i in keep],
        exclude=[task.exclude[i] for i in keep],
        relevant=[task.relevant[i] for i in keep],
        liked=[task.liked[i] for i in keep],
    )


def clean(lists: list[np.ndarray]) -> list[np.ndarray]:
    return [x[x >= 0] for x in lists]
