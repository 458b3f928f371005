"""Scoring with a trained model: aligned pairs, and blocks of users against the whole catalog.

The TorchServe handler and the Beam job both score through this class, with the same model file
and the same catalog features, so their numbers equal the evaluation's.
"""

from __future__ import annotations

import torch


class Scorer:
    """Wraps a RatingMLP (eager or TorchScript) with the catalog's book projections precomputed."""

    def __init__(self, model: torch.nn.Module, book_feats: torch.Tensor, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.book_feats = book_feats.to(self.device)
        with torch.inference_mode():
            self.book_proj = self.model.project_books(self.book_feats)

    @torch.inference_mode()
    def rate(self, user_feats: torch.Tensor, book_feats: torch.Tensor) -> torch.Tensor:
        """Ratings of aligned pairs [N] (user_feats [N, Du], book_feats [N, Db])."""
        return self.model(user_feats.to(self.device), book_feats.to(self.device)).float().cpu()

    @torch.inference_mode()
    def score_all(self, user_feats: torch.Tensor, book_chunk: int = 4096) -> torch.Tensor:
        """Scores [U, B] of every user against every catalog book, ``book_chunk`` books at a time
        so the [U, chunk, hidden] intermediate stays bounded."""
        user_proj = self.model.project_users(user_feats.to(self.device))
        parts = [
            self.model.score_matrix(user_proj, self.book_proj[start : start + book_chunk])
            for start in range(0, self.book_proj.shape[0], book_chunk)
        ]
        return torch.cat(parts, dim=1).float().cpu()

    @torch.inference_mode()
    def top_k(
        self, user_feats: torch.Tensor, k: int, exclude: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` (scores, catalog rows) per user; ``exclude[i]`` lists rows user i must not get."""
        scores = self.score_all(user_feats)
        if exclude is not None:
            for i, rows in enumerate(exclude):
                if len(rows):
                    scores[i, rows] = float("-inf")
        k = min(k, scores.shape[1])
        return torch.topk(scores, k, dim=1)
