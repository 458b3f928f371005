"""The retrieval model: two towers that place readers and books in one vector space.

The rating MLP answers "if this reader read this book, how would they rate it?"; this model answers
"which books is this reader likely to read next?". It is trained on who read what (every training
rating plus implicit reads) with in-batch sampled softmax, and kept apart from how it is trained
(``train/retrieval/step.py``). Serving and batch load its scripted file (``torch.jit.load`` alone),
never this module.

- **Book tower**: the book feature vector (text embedding + rating statistics of the book, its
  author and publisher; ``model/features.py``) through an MLP, plus learned author and publisher
  embeddings, plus a learned per-book embedding for books that were read in training. A new book,
  or one nobody has rated, gets a vector from its text and metadata alone: its id part is zero,
  and training drops the id part at random so the content part learns to stand on its own.
- **User tower**: the user feature vector (text, taste profile, history stats) through an MLP,
  plus the mean of learned "context" embeddings of the books in the reader's history. The history
  is a bag of catalog rows, so a known user (training history) and a new user (the few ratings in
  a request) go through the same code.

Both towers end L2-normalised; a score is ``cosine / temperature`` (a logit of the softmax the
model was trained with). Every method is TorchScript-compatible.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TwoTower(nn.Module):
    """User and book towers over the rating MLP's feature vectors, plus id, author and history bags."""

    def __init__(
        self,
        user_dim: int,
        book_dim: int,
        n_books: int,
        n_authors: int,
        n_publishers: int,
        dim: int = 64,
        hidden: int = 256,
        temperature: float = 0.1,
    ):
        super().__init__()
        self.user_mlp = nn.Sequential(nn.Linear(user_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.book_mlp = nn.Sequential(nn.Linear(book_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        # Row 0 is "unknown" (padding, stays zero); code c is row c + 1.
        # Sparse gradients: a step touches a few thousand rows of tables as long as the catalog, so
        # its gradient and optimizer update must not cost the whole table (see ``sparse_parameters``).
        self.author = nn.Embedding(n_authors + 1, dim, padding_idx=0, sparse=True)
        self.publisher = nn.Embedding(n_publishers + 1, dim, padding_idx=0, sparse=True)
        self.book_id = nn.Embedding(n_books, dim, sparse=True)
        self.context = nn.EmbeddingBag(n_books, dim, mode="mean", sparse=True)
        for table in (self.author, self.publisher, self.book_id, self.context):
            nn.init.zeros_(table.weight)
        self.register_buffer("user_mean", torch.zeros(user_dim))
        self.register_buffer("user_std", torch.ones(user_dim))
        self.register_buffer("book_mean", torch.zeros(book_dim))
        self.register_buffer("book_std", torch.ones(book_dim))
        # Books read in training own an id embedding; the others are embedded from content alone.
        self.register_buffer("id_known", torch.zeros(n_books, dtype=torch.bool))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.dim = dim

    @torch.jit.ignore
    def sparse_parameters(self) -> list[nn.Parameter]:
        """The embedding tables, whose gradients are sparse (an optimizer such as SparseAdam)."""
        return [t.weight for t in (self.author, self.publisher, self.book_id, self.context)]

    def set_standardisation(self, users: torch.Tensor, books: torch.Tensor) -> None:
        """Fix the input standardisation from training feature tables."""
        for name, x in (("user", users), ("book", books)):
            getattr(self, f"{name}_mean").copy_(x.mean(0))
            getattr(self, f"{name}_std").copy_(x.std(0).clamp_min(1e-6))

    @torch.jit.export
    def embed_books(
        self,
        feats: torch.Tensor,
        rows: torch.Tensor,
        authors: torch.Tensor,
        publishers: torch.Tensor,
    ) -> torch.Tensor:
        """Unit book vectors [B, dim] from feature vectors [B, book_dim], catalog rows (-1: not in the
        catalog), and author / publisher codes (-1: unknown)."""
        x = self.book_mlp((feats - self.book_mean) / self.book_std)
        x = x + self.author(authors.clamp_min(-1) + 1) + self.publisher(publishers.clamp_min(-1) + 1)
        safe = rows.clamp_min(0)
        has_id = (rows >= 0) & self.id_known[safe]
        x = x + self.book_id(safe) * has_id.unsqueeze(1).to(x.dtype)
        return F.normalize(x, dim=1)

    @torch.jit.export
    def embed_users(self, feats: torch.Tensor, history: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Unit user vectors [U, dim] from feature vectors [U, user_dim] and a bag of catalog rows per
        user: ``history`` [M] flat, ``offsets`` [U] where each user's rows start (empty bags allowed)."""
        x = self.user_mlp((feats - self.user_mean) / self.user_std)
        x = x + self.context(history, offsets)
        return F.normalize(x, dim=1)

    @torch.jit.export
    def scores(self, users: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
        """Logits [U, B] of unit user vectors against unit book vectors."""
        return users @ books.t() / self.temperature

    def forward(self, users: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
        return self.scores(users, books)


def history_bags(
    rows: list[torch.Tensor] | list, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat rows, offsets) of per-user lists of catalog rows, the ``embed_users`` input."""
    lengths = [len(r) for r in rows]
    flat = (
        torch.cat([torch.as_tensor(r, dtype=torch.long) for r in rows])
        if rows and sum(lengths)
        else torch.zeros(0, dtype=torch.long)
    )
    offsets = torch.tensor([0, *lengths[:-1]], dtype=torch.long).cumsum(0) if rows else torch.zeros(0, dtype=torch.long)
    return flat.to(device), offsets.to(device)
