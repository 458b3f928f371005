"""The serving engine: load a model folder once, then score a batch of validated requests together.

Everything numeric goes through the shared ``model/`` code (``ModelFolder.load``: catalog features,
the saved encoder, the ``Scorer`` and the recommender; ``book_text`` / ``user_text``), so a
pair scored here gets the number training's evaluation and the batch job give it. The TorchServe
handler is a thin wrapper around this class; the benchmark calls the same handler in-process.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handlers.schema import (
    INTERNAL_ERROR,
    CatalogBook,
    KnownUser,
    Limits,
    NewBook,
    NewUser,
    RateBody,
    RecommendBody,
    Refusal,
    Request,
    RequestError,
    SimilarBody,
    parse_request,
)
from model.artifacts import ModelFolder
from model.reasons import Reasons
from model.similar import SimilarBooks, group_codes_of, new_book_vectors
from model.text import book_text, user_text

log = logging.getLogger("bookrec.serve")

Result = tuple[int, dict[str, Any]]  # (HTTP status, JSON body) of one answer
User = KnownUser | NewUser
Book = CatalogBook | NewBook
_NO_ROWS = np.zeros(0, dtype=np.int64)


class BookrecEngine:
    """Catalog, encoder and MLP of one model folder (a run folder or an unpacked ``.mar``)."""

    def __init__(
        self,
        model_dir: Path,
        device: torch.device | str = "cpu",
        limits: Limits | None = None,
        *,
        rating_model: torch.nn.Module | None = None,
        verified: bool = False,
    ):
        """``rating_model``: the folder's shipped model when the caller already loaded it;
        ``verified``: the caller verifies the folder against its manifest (``ModelFolder.verifying``
        around this); otherwise it is verified here while it loads."""
        self.model_dir = Path(model_dir)
        self.limits = limits or Limits()
        folder = ModelFolder(self.model_dir)
        with nullcontext() if verified else folder.verifying(serving=True):
            self.model = folder.load(device, rating_model=rating_model, encoder=True)
        self.device = self.model.device
        self.catalog, self.encoder = self.model.catalog, self.model.encoder
        self.scorer, self.recommender = self.model.scorer, self.model.recommender
        self.metadata = self.model.metadata
        self.similar = self.model.similar_index()
        self.version = str(self.metadata.get("version", "unversioned"))
        books = self.catalog.books
        # Plain lists: formatting a top-k answer indexes these a few times per request.
        self._isbn = books["isbn"].tolist()
        self._title = [None if v is None or v != v else str(v) for v in books["title"].tolist()]
        self._author = [None if v is None or v != v else str(v) for v in books["author"].tolist()]

    # ----------------------------------------------------------------------------------- requests
    def parse(self, body: Any) -> Request:
        """Validate one body against the schema and the catalog (raises ``RequestError``)."""
        return parse_request(
            body,
            self.limits,
            known_isbn=self.catalog.book_index.__contains__,
            known_user=self.catalog.user_index.__contains__,
        )

    def validate(self, bodies: list[Any]) -> list[Request | Refusal]:
        """Per body, in order: the validated ``Request``, or the ``Refusal`` of it.

        A validator bug is a 500 for that body alone: it must not take the worker down.
        """
        out: list[Request | Refusal] = []
        for i, body in enumerate(bodies):
            try:
                out.append(self.parse(body))
            except RequestError as err:
                out.append(err.refusal)
            except Exception:
                log.exception("request %d: unexpected validation failure", i)
                out.append(INTERNAL_ERROR)
        return out

    def answer(self, parsed: list[Request | Refusal]) -> list[Result]:
        """(HTTP status, JSON body) per entry of ``validate``; the valid requests are scored as one batch.

        A refused request keeps its 4xx and does not disturb the others. Should the batched scoring
        itself fail, each request is retried alone so one pathological request cannot fail its
        neighbours; what still fails gets a 500.
        """
        results: list[Result | None] = [p.result() if isinstance(p, Refusal) else None for p in parsed]
        valid = [(i, p) for i, p in enumerate(parsed) if not isinstance(p, Refusal)]
        if valid:
            try:
                for i, answer in zip((i for i, _ in valid), self.score([r for _, r in valid]), strict=True):
                    results[i] = (200, answer)
            except Exception:
                log.exception("batched scoring of %d requests failed; scoring them one by one", len(valid))
                for i, request in valid:
                    try:
                        results[i] = (200, self.score([request])[0])
                    except Exception:
                        log.exception("request %d: scoring failed", i)
                        results[i] = INTERNAL_ERROR.result()
        return [r if r is not None else INTERNAL_ERROR.result() for r in results]

    def run(self, bodies: list[Any]) -> list[Result]:
        """(HTTP status, JSON body) per request, in order: ``answer(validate(bodies))``."""
        return self.answer(self.validate(bodies))

    # ------------------------------------------------------------------------------------ scoring
    def score(self, requests: list[Request]) -> list[dict[str, Any]]:
        """Answers of validated requests: the similar-books requests as one batch, the others as one
        encoder call, one pair batch and one top-k batch."""
        similar = [j for j, r in enumerate(requests) if isinstance(r, SimilarBody)]
        if not similar:
            return self._score_users(requests)
        answers: list[dict[str, Any]] = [{}] * len(requests)
        for j, answer in zip(similar, self._similar([requests[j] for j in similar]), strict=True):
            answers[j] = answer
        rest = sorted(set(range(len(requests))) - set(similar))
        if rest:
            for j, answer in zip(rest, self._score_users([requests[j] for j in rest]), strict=True):
                answers[j] = answer
        return answers

    def _score_users(self, requests: list[Request]) -> list[dict[str, Any]]:
        """Answers of rate and recommend requests: one encoder call, one pair batch, one top-k batch."""
        users = [r.user for r in requests]
        new_users = [u for u in users if not u.known]
        new_books = [b for r in requests if isinstance(r, RateBody) for b in r.books if not b.known]
        texts = [user_text(u.city, u.region, u.country, u.age) for u in new_users]
        texts += [book_text(b.title, b.author, b.year, b.publisher) for b in new_books]
        emb = torch.from_numpy(self.encoder.embed(texts)) if texts else torch.zeros(0, self.encoder.dim)
        user_feats = self._user_features(users, emb[: len(new_users)])

        answers: list[dict[str, Any] | None] = [None] * len(requests)
        rate = [j for j, r in enumerate(requests) if isinstance(r, RateBody)]
        if rate:
            pair_user = [n for n, j in enumerate(rate) for _ in requests[j].books]
            books = [b for j in rate for b in requests[j].books]
            ratings = self._rate(user_feats[rate], pair_user, books, emb[len(new_users) :])
            start = 0
            for j in rate:
                request = requests[j]
                part = ratings[start : start + len(request.books)].tolist()
                start += len(request.books)
                answers[j] = self._rate_answer(request, part)
        recommend = [j for j, r in enumerate(requests) if isinstance(r, RecommendBody)]
        if recommend:
            history = [self._rated_rows(requests[j].user) for j in recommend]
            exclude = [h if requests[j].exclude_rated else _NO_ROWS for h, j in zip(history, recommend, strict=True)]
            k = max(requests[j].k for j in recommend)
            recs = self.recommender.recommend(user_feats[recommend], history, k, exclude)
            reasons = self.recommender.explain(history, recs)
            rows, relevance, rating = (x.cpu().tolist() for x in (recs.rows, recs.relevance, recs.rating))
            for n, j in enumerate(recommend):
                answers[j] = self._recommend_answer(requests[j], rows[n], relevance[n], rating[n], reasons, n)
        return answers  # type: ignore[return-value]

    @property
    def last_timings(self) -> dict[str, float]:
        """Seconds the last recommend batch spent in retrieval and in the rating rerank."""
        return self.recommender.last_timings

    def _user_features(self, users: list[User], new_emb: torch.Tensor) -> torch.Tensor:
        """Feature rows: the catalog's for known users, ``Catalog.new_user_features`` for new ones."""
        feats = torch.empty(len(users), self.catalog.user_feats.shape[1])
        known = [j for j, u in enumerate(users) if u.known]
        if known:
            feats[known] = self.catalog.user_feats[self.catalog.user_rows([users[j].user_id for j in known])]
        fresh = [j for j in known if users[j].ratings]  # known readers' ratings since the version was built
        if fresh:
            feats[fresh] = self.catalog.known_user_features(
                [self.catalog.user_index[users[j].user_id] for j in fresh],
                torch.tensor([n for n, j in enumerate(fresh) for _ in users[j].ratings], dtype=torch.long),
                [r.isbn for j in fresh for r in users[j].ratings],
                torch.tensor([r.rating for j in fresh for r in users[j].ratings], dtype=torch.float32),
            )
        new = [j for j, u in enumerate(users) if not u.known]
        if new:
            hist_user = [n for n, j in enumerate(new) for _ in users[j].ratings]
            isbns = [r.isbn for j in new for r in users[j].ratings]
            values = [r.rating for j in new for r in users[j].ratings]
            feats[new] = self.catalog.new_user_features(
                new_emb,
                torch.tensor(hist_user, dtype=torch.long),
                isbns,
                torch.tensor(values, dtype=torch.float32),
            )
        return feats

    @torch.inference_mode()
    def _rate(
        self, user_feats: torch.Tensor, pair_user: list[int], books: list[Book], new_emb: torch.Tensor
    ) -> torch.Tensor:
        """Ratings of (user, book) pairs, each user projected once and catalog books taken from the
        Scorer's precomputed projections, so 100 pairs of one user cost one small matmul."""
        book_proj = torch.empty(len(books), self.scorer.book_proj.shape[1], device=self.device)
        known = [j for j, b in enumerate(books) if b.known]
        if known:
            rows = self.catalog.book_rows([books[j].isbn for j in known]).to(self.device)
            book_proj[known] = self.scorer.book_proj[rows]
        new = [j for j, b in enumerate(books) if not b.known]
        if new:
            feats = self.catalog.new_book_features(
                new_emb, [books[j].author for j in new], [books[j].publisher for j in new]
            )
            book_proj[new] = self.scorer.project_books(feats)
        user_proj = self.scorer.project_users(user_feats)
        return self.scorer.rate_projected(user_proj, torch.tensor(pair_user, dtype=torch.long), book_proj)

    def _similar(self, requests: list[SimilarBody]) -> list[dict[str, Any]]:
        """The k most similar catalog books of each request's book (``model/similar.py``): catalog
        books from their rows, new books from their text, embedded as a ``rate`` request's are."""
        k = max(r.k for r in requests)
        found: list[tuple[SimilarBooks, int]] = [None] * len(requests)  # type: ignore[list-item]
        known = [j for j, r in enumerate(requests) if r.book.known]
        if known:
            rows = self.catalog.book_rows([requests[j].book.isbn for j in known]).numpy()
            lists = self.similar.of_books(rows, k)
            for n, j in enumerate(known):
                found[j] = (lists, n)
        new = [j for j, r in enumerate(requests) if not r.book.known]
        if new:
            books = [requests[j].book for j in new]
            emb = torch.from_numpy(
                self.encoder.embed([book_text(b.title, b.author, b.year, b.publisher) for b in books])
            )
            authors, publishers = [b.author for b in books], [b.publisher for b in books]
            feats = self.catalog.new_book_features(emb, authors, publishers)
            vectors = new_book_vectors(self.recommender.towers, self.catalog, feats, authors, publishers)
            codes = group_codes_of(self.catalog, "author", authors).numpy()
            lists = self.similar.of_new_books(vectors, codes, k)
            for n, j in enumerate(new):
                found[j] = (lists, n)
        return [self._similar_answer(r, *f) for r, f in zip(requests, found, strict=True)]

    def _rated_rows(self, user: User) -> np.ndarray:
        """Catalog rows the user already read: the catalog's history and the request's own ratings."""
        rows = self.catalog.book_rows([r.isbn for r in user.ratings]).numpy().astype(np.int64)
        if user.known:
            read = self.catalog.rated_by(self.catalog.user_index[user.user_id])
            return np.concatenate([read, rows[~np.isin(rows, read)]]) if len(rows) else read
        return rows

    # --------------------------------------------------------------------------------- formatting
    def _user_echo(self, user: User) -> dict[str, Any]:
        if user.known:
            echo = {"user_id": user.user_id, "known": True}
            return {**echo, "ratings_used": len(user.ratings)} if user.ratings else echo
        return {"user_id": None, "known": False, "ratings_used": len(user.ratings)}

    def _rate_answer(self, request: RateBody, ratings: list[float]) -> dict[str, Any]:
        predictions = []
        for book, rating in zip(request.books, ratings, strict=True):
            item: dict[str, Any] = {"isbn": book.isbn} if book.known else {"isbn": None, "title": book.title}
            item["rating"] = rating
            predictions.append(item)
        return {
            "action": "rate",
            "model_version": self.version,
            "user": self._user_echo(request.user),
            "predictions": predictions,
        }

    def _recommend_answer(
        self,
        request: RecommendBody,
        rows: list[int],
        relevance: list[float],
        rating: list[float],
        reasons: Reasons,
        u: int,
    ) -> dict[str, Any]:
        items = []
        for row, rel, score in zip(rows[: request.k], relevance[: request.k], rating[: request.k], strict=True):
            if row < 0:  # fewer unrated books than k (tiny catalogs only)
                break
            n = len(items)
            because: dict[str, Any] = {}
            graph_book = int(reasons.graph_book[u, n])
            if graph_book >= 0:
                because["graph"] = self._isbn[graph_book]
            author_books = [self._isbn[b] for b in reasons.author_books[u, n].tolist() if b >= 0]
            if author_books:
                because["author"] = author_books
            items.append(
                {
                    "rank": n + 1,
                    "isbn": self._isbn[row],
                    "title": self._title[row],
                    "author": self._author[row],
                    "score": score,
                    "relevance": rel,
                    "sources": reasons.source_names(u, n),
                    "because": because,
                }
            )
        return {
            "action": "recommend",
            "model_version": self.version,
            "user": self._user_echo(request.user),
            "k": request.k,
            "exclude_rated": request.exclude_rated,
            "recommendations": items,
        }

    def _similar_answer(self, request: SimilarBody, lists: SimilarBooks, q: int) -> dict[str, Any]:
        book = request.book
        if book.known:
            row = self.catalog.book_index[book.isbn]
            echo = {"isbn": book.isbn, "title": self._title[row], "author": self._author[row], "known": True}
        else:
            echo = {"isbn": None, "title": book.title, "author": book.author, "known": False}
        items = []
        for n in range(min(request.k, lists.rows.shape[1])):
            row = int(lists.rows[q, n])
            if row < 0:  # fewer books than k have any source's vote (tiny catalogs only)
                break
            items.append(
                {
                    "rank": n + 1,
                    "isbn": self._isbn[row],
                    "title": self._title[row],
                    "author": self._author[row],
                    "score": float(lists.score[q, n]),
                    "sources": lists.source_names(q, n),
                }
            )
        return {
            "action": "similar",
            "model_version": self.version,
            "book": echo,
            "k": request.k,
            "similar": items,
        }

    # ------------------------------------------------------------------------------------ warm-up
    def warm_up_requests(self) -> list[dict[str, Any]]:
        """Requests touching every code path (known/new user, known/new book, top-k)."""
        user_id = int(self.catalog.users["user_id"].iat[0])
        isbns = self._isbn[:2]
        new_user = {"city": "lisbon", "country": "portugal", "age": 30, "ratings": [{"isbn": isbns[0], "rating": 8}]}
        new_book = {"title": "warm-up", "author": "nobody", "year": 2000, "publisher": "none"}
        return [
            {"action": "rate", "user": {"user_id": user_id}, "books": [*isbns, new_book]},
            {"action": "rate", "user": new_user, "books": isbns[:1]},
            {"action": "recommend", "user": {"user_id": user_id}, "k": 10},
            {"action": "recommend", "user": new_user, "k": 10, "exclude_rated": True},
            {"action": "similar", "book": isbns[0], "k": 10},
            {"action": "similar", "book": new_book, "k": 10},
        ]

    def warm_up(self, rounds: int = 3) -> None:
        """Run the warm-up requests alone and batched a few times, so the first real request does
        not pay TorchScript's profiling runs or the allocator's first growth."""
        requests = self.warm_up_requests()
        for _ in range(rounds):
            for body in requests:
                self._expect_ok(self.run([body]))
            self._expect_ok(self.run(requests))

    @staticmethod
    def _expect_ok(results: list[Result]) -> None:
        for status, body in results:
            if status != 200:
                raise RuntimeError(f"warm-up request failed with {status}: {body}")
