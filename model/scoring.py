"""Scoring with a trained model: the rating of aligned pairs and of a user's own candidate books.

The TorchServe handler, the recommender and the batch job all rate through ``Scorer``,
with the same model file and the same catalog features, so their numbers equal the evaluation's.
The first layer is split (``W [u; b] = W_u u + W_b b``): the book set is projected once with the
model's own ``project_books``, users with ``project_users``, and a pair costs only the head on
``P_u + P_b``. Scoring every user against every book (the batch job's all-pairs mode, the
evaluation's rating-only top-K) is not a worker's job: ``batch/all_pairs.py`` does it from a
``Scorer``'s projections.
"""

from __future__ import annotations

import functools

import torch


def _inference(fn):
    """``torch.inference_mode`` unless already in it: the serving path calls several scorer methods
    per request from inside inference mode, and entering it again costs a few microseconds each."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


class Scorer:
    """Wraps a RatingMLP (eager or TorchScript) with the book set's projections precomputed."""

    def __init__(self, model: torch.nn.Module, book_feats: torch.Tensor, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.book_feats = book_feats.to(self.device)
        with torch.inference_mode():
            self.book_proj = self.model.project_books(self.book_feats)

    def subset(self, rows: torch.Tensor) -> Scorer:
        """The same model over the book-set positions ``rows`` only."""
        return Scorer(self.model, self.book_feats[rows.to(self.device)], self.device)

    @property
    def n_books(self) -> int:
        return int(self.book_proj.shape[0])

    @_inference
    def rate(self, user_feats: torch.Tensor, book_feats: torch.Tensor) -> torch.Tensor:
        """Ratings of aligned pairs [N] (user_feats [N, Du], book_feats [N, Db])."""
        user_proj = self.project_users(user_feats)
        index = torch.arange(user_proj.shape[0], device=self.device)
        return self.rate_projected(user_proj, index, self.project_books(book_feats))

    @_inference
    def project_users(self, user_feats: torch.Tensor) -> torch.Tensor:
        """First-layer user projections [U, h0] (the model's own code, as in evaluation)."""
        return self.model.project_users(user_feats.to(self.device))

    @_inference
    def project_books(self, book_feats: torch.Tensor) -> torch.Tensor:
        """First-layer projections [B, h0] of books outside the book set (new books)."""
        return self.model.project_books(book_feats.to(self.device))

    @_inference
    def rate_projected(self, user_proj: torch.Tensor, pair_user: torch.Tensor, book_proj: torch.Tensor) -> torch.Tensor:
        """Ratings [N] float32 of pairs (``user_proj[pair_user[i]]``, ``book_proj[i]``), on the CPU:
        ``RatingMLP.forward`` = ``head(P_u + P_b)`` with each user projected once."""
        return self.model.head(user_proj[pair_user.to(self.device)] + book_proj).float().cpu()

    @_inference
    def rate_rows(self, user_proj: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Ratings [U, N] of each projected user against its own N book-set rows (``rows`` [U, N]):
        the rerank of retrieved candidates, on the scorer's device."""
        return self.model.head(user_proj.unsqueeze(1) + self.book_proj[rows]).float()
