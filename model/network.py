"""The rating MLP, kept apart from how it is trained.

The first layer is split in a user half and a book half, so ``W [u; b] = W_u u + W_b b``: a
scorer projects every user and every book once and then only evaluates the small head on
``relu(P_u + P_b)`` per pair. All methods are TorchScript-compatible; the scripted file is
self-contained (``torch.jit.load`` alone, no project import).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from model.ranges import RATING_MAX, RATING_MIN


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer in plain tensor ops (per-output-channel symmetric scales).

    Unlike ``torch.ao.quantization`` it runs on CPU and CUDA and compiles with TorchScript;
    activations stay in floating point.
    """

    def __init__(self, weight_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias if bias is not None else torch.zeros(weight_q.shape[0]))
        self.in_features = int(weight_q.shape[1])
        self.out_features = int(weight_q.shape[0])

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        weight_q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        return cls(weight_q, scale, bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized(self.scale.dtype)

    @torch.jit.export
    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in ``dtype``: int8 values times their row's scale."""
        return self.weight_q.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), self.bias.to(x.dtype))


class RatingMLP(nn.Module):
    """Predicts a 1..10 rating from a user vector and a book vector."""

    def __init__(
        self,
        user_dim: int,
        book_dim: int,
        hidden: list[int],
        dropout: float = 0.0,
        global_mean: float = 7.0,
    ):
        super().__init__()
        if not hidden:
            raise ValueError("the MLP needs at least one hidden layer")
        self.user_in = nn.Linear(user_dim, hidden[0])
        self.book_in = nn.Linear(book_dim, hidden[0], bias=False)
        layers: list[nn.Module] = []
        for width_in, width_out in zip(hidden, [*hidden[1:], 1], strict=False):
            layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(width_in, width_out)]
        self.tail = nn.Sequential(*layers)
        # Input standardisation lives in the model so every caller feeds raw features.
        self.register_buffer("user_mean", torch.zeros(user_dim))
        self.register_buffer("user_std", torch.ones(user_dim))
        self.register_buffer("book_mean", torch.zeros(book_dim))
        self.register_buffer("book_std", torch.ones(book_dim))
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))
        self.rating_min = RATING_MIN
        self.rating_max = RATING_MAX

    def set_standardisation(self, users: torch.Tensor, books: torch.Tensor) -> None:
        """Fix the input standardisation from training feature tables."""
        for name, x in (("user", users), ("book", books)):
            getattr(self, f"{name}_mean").copy_(x.mean(0))
            getattr(self, f"{name}_std").copy_(x.std(0).clamp_min(1e-6))

    @torch.jit.export
    def project_users(self, users: torch.Tensor) -> torch.Tensor:
        """First-layer user half (bias included): [U, user_dim] -> [U, hidden0]."""
        return self.user_in((users - self.user_mean) / self.user_std)

    @torch.jit.export
    def project_books(self, books: torch.Tensor) -> torch.Tensor:
        """First-layer book half: [B, book_dim] -> [B, hidden0]."""
        return self.book_in((books - self.book_mean) / self.book_std)

    @torch.jit.export
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rating from summed projections [..., hidden0] -> [...]; clipped to 1..10 in eval mode."""
        out = self.tail(hidden).squeeze(-1) + self.global_mean
        if not self.training:
            out = out.clamp(self.rating_min, self.rating_max)
        return out

    def forward(self, users: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
        """Ratings of aligned pairs: users [N, user_dim], books [N, book_dim] -> [N]."""
        return self.head(self.project_users(users) + self.project_books(books))

    @torch.jit.export
    def score_matrix(self, user_proj: torch.Tensor, book_proj: torch.Tensor) -> torch.Tensor:
        """Every user against every book from projections: [U, h0] x [B, h0] -> [U, B]."""
        return self.head(user_proj.unsqueeze(1) + book_proj.unsqueeze(0))

    @torch.jit.export
    def head_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight [out, in], bias [out]) of the head's linear layers in order, float32 and
        dequantized. The head is ``relu -> [dropout] -> linear`` repeated, the last linear having
        one output unit; fast scorers rebuild it from these without knowing the layer classes."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in self.tail:
            # hasattr, not isinstance: TorchScript resolves it per layer, also for Int8Linear.
            if hasattr(layer, "weight_q"):
                out.append((layer.dequantized(torch.float32), layer.bias.float()))
            elif hasattr(layer, "out_features"):
                bias = layer.bias
                zeros = torch.zeros(layer.out_features, device=layer.weight.device)
                out.append((layer.weight.float(), bias.float() if bias is not None else zeros))
        return out

    def linears(self) -> list[nn.Module]:
        """The tail's linear layers in order (what pruning and quantization walk)."""
        return [m for m in self.tail if isinstance(m, (nn.Linear, Int8Linear))]

    def shapes(self) -> dict[str, list[int]]:
        """Weight shapes of every layer, for reports."""
        out = {
            "user_in": list(self.user_in.weight.shape),
            "book_in": list(self.book_in.weight.shape),
        }
        for i, layer in enumerate(self.linears()):
            out[f"tail.{i}"] = [layer.out_features, layer.in_features]
        return out


def quantize_int8(model: RatingMLP) -> RatingMLP:
    """A copy of ``model`` with every linear layer's weights in int8 (``Int8Linear``)."""
    import copy

    out = copy.deepcopy(model).eval()
    out.user_in = Int8Linear.from_linear(model.user_in)
    out.book_in = Int8Linear.from_linear(model.book_in)
    for i, layer in enumerate(out.tail):
        if isinstance(layer, nn.Linear):
            out.tail[i] = Int8Linear.from_linear(layer)
    return out
