"""The texts a student learns from: what training, serving and batch embed, held-out texts kept apart."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from model.text import book_text, user_text
from train.data.tables import cold_test_books

COLD_USER_SPLITS = ("cold_user", "cold_both")


@dataclass
class DistillCorpus:
    """Unique texts to train on and to judge on (never trained on), disjoint."""

    train: list[str]
    heldout: list[str]

    def digest(self) -> str:
        """Hash of both text sets (order-free): the corpus part of the student cache key."""
        h = hashlib.sha256()
        for part in (self.train, self.heldout):
            for text in sorted(part):
                h.update(text.encode())
                h.update(b"\x00")
            h.update(b"\x01")
        return h.hexdigest()


def _book_request_form(row: tuple, rng: np.random.Generator) -> str:
    """A new book as a request may send it: the title, with some of author, year, publisher left out."""
    title, author, year, publisher = row
    keep = rng.random(3) < 0.5
    return book_text(title, author if keep[0] else None, year if keep[1] else None, publisher if keep[2] else None)


def _user_request_form(row: tuple, rng: np.random.Generator) -> str:
    """A new user as a request may send one: some of city, region, country and age left out."""
    keep = rng.random(4) < 0.5
    return user_text(*(value if k else None for value, k in zip(row, keep, strict=True)))


def _texts(frame: pd.DataFrame, columns: list[str], base, form, share: float, rng: np.random.Generator) -> list[str]:
    rows = list(frame[columns].itertuples(index=False, name=None))
    texts = [base(*row) for row in rows]
    picked = np.flatnonzero(rng.random(len(rows)) < share)
    return texts + [form(rows[i], rng) for i in picked]


def build_corpus(
    books: pd.DataFrame,
    users: pd.DataFrame,
    ratings: pd.DataFrame,
    holdout_frac: float,
    request_forms: float,
    max_train_texts: int,
    seed: int,
) -> DistillCorpus:
    """Book and user texts (plus request forms) of the catalog, split into train and held-out.

    Every text of a cold-test book or user is held out, so the cold-start evaluation sees the student
    on texts it never saw, as new arrivals are; so is a seeded ``holdout_frac`` of the other texts.
    """
    rng = np.random.default_rng(seed)
    cold_books = cold_test_books(ratings)
    cold_users = ratings.loc[ratings["split"].isin(COLD_USER_SPLITS), "user_id"].unique()
    readers = users[users["user_id"].isin(ratings["user_id"])]
    book_cols, user_cols = ["title", "author", "year", "publisher"], ["city", "region", "country", "age"]
    cold_b = books["isbn"].isin(cold_books)
    cold_u = readers["user_id"].isin(cold_users)
    warm = _texts(books[~cold_b], book_cols, book_text, _book_request_form, request_forms, rng)
    warm += _texts(readers[~cold_u], user_cols, user_text, _user_request_form, request_forms, rng)
    cold = _texts(books[cold_b], book_cols, book_text, _book_request_form, request_forms, rng)
    cold += _texts(readers[cold_u], user_cols, user_text, _user_request_form, request_forms, rng)

    heldout = set(cold)
    candidates = sorted(set(warm) - heldout)
    drawn = rng.random(len(candidates)) < holdout_frac
    heldout.update(t for t, d in zip(candidates, drawn, strict=True) if d)
    train = [t for t, d in zip(candidates, drawn, strict=True) if not d]
    if len(train) > max_train_texts:
        train = sorted(rng.choice(train, size=max_train_texts, replace=False).tolist())
    return DistillCorpus(train=train, heldout=sorted(heldout))
