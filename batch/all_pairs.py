"""All-pairs scoring: blocks of users against every book of a scorer's book set, the batch job's hot path.

One batch job scores ~10^9 pairs, so ``AllPairsScorer`` does not call the model per pair. The first
layer is split (``W [u; b] = W_u u + W_b b``), so users and books are projected once with the model's
own ``project_users`` / ``project_books`` (``model.scoring.Scorer``, as the worker does); per pair
only the head is left: ``relu(P_u + P_b)`` then the tail MLP. ``HeadKernel`` evaluates that head
from weights dequantized once, per user over cache-sized chunks of books with preallocated buffers:
one elementwise ``maximum`` (the user's part of the first tail layer moves into a per-user bias),
one ``addmm`` + ReLU per hidden layer and an ``mv`` straight into the output row; optionally on
several threads (torch ops release the GIL). It is built from the layers the model itself exposes
(``RatingMLP.head_layers``); a model without them falls back to its own ``score_matrix``.

A caller may plug in a faster per-user row kernel (``AllPairsScorer.row_kernel``): the compiled
AVX2 head (``batch/native_head.py``) is one. The evaluation's "rating MLP alone" top-K ranks every
book through ``AllPairsScorer.top_k``. A TorchServe worker never scores all pairs, so none of this
ships in the model archive.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from model.network import RATING_MAX, RATING_MIN
from model.scoring import Scorer
from model.topk import top_k_excluding

PRECISIONS = ("fp32", "bf16")
# Pairs per block: H [pairs, h0] plus the hidden activations stay within a core's L2/L3 share;
# measured best on a 2-core AVX2 EPYC for h0=96 (1024..16384 tried, see bench/BATCH_RESULTS.md).
DEFAULT_BLOCK_PAIRS = 4096


@dataclass
class _Layer:
    weight_t: torch.Tensor  # [in, out], contiguous, compute dtype
    bias: torch.Tensor  # [out], compute dtype


class HeadKernel:
    """The tail MLP on ``relu(P_u + P_b)`` for blocks of pairs, from weights dequantized once.

    The head is ``relu, linear, ..., relu, linear(·, 1)`` as ``RatingMLP.head_layers`` describes it
    (eager or TorchScript, fp32 or int8 weights), evaluated in ``dtype``.
    """

    def __init__(
        self,
        hidden: list[_Layer],
        out_weight: torch.Tensor,
        out_bias: float,
        offset: float,
        lo: float,
        hi: float,
        dtype: torch.dtype,
    ):
        self.hidden = hidden
        self.out_weight = out_weight  # [h_last]
        # The output unit's bias and the global mean, added once per score.
        self.shift = out_bias + offset
        self.lo, self.hi = lo, hi
        self.dtype = dtype
        self.width = hidden[0].weight_t.shape[0] if hidden else out_weight.shape[0]

    @classmethod
    def from_model(cls, model: torch.nn.Module, precision: str = "fp32") -> HeadKernel | None:
        """The kernel for ``model``'s head (``head_layers``), or None when the model exposes none or
        its head is not the ``relu -> linear`` chain those layers describe (checked numerically)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if not hasattr(model, "head_layers") or not hasattr(model, "global_mean"):
            return None
        with torch.inference_mode():
            linears = [(w.detach().float(), b.detach().float()) for w, b in model.head_layers()]
        if len(linears) < 2 or linears[-1][0].shape[0] != 1:
            return None
        exact = cls._build(model, linears, torch.float32)
        if not exact._matches(model):
            return None
        return exact if precision == "fp32" else cls._build(model, linears, torch.bfloat16)

    @classmethod
    def _build(cls, model: torch.nn.Module, linears: list, dtype: torch.dtype) -> HeadKernel:
        (last_w, last_b), hidden = linears[-1], linears[:-1]
        return cls(
            [_Layer(w.t().contiguous().to(dtype), b.to(dtype)) for w, b in hidden],
            last_w[0].contiguous().to(dtype),
            float(last_b[0]),
            float(model.global_mean),
            float(getattr(model, "rating_min", RATING_MIN)),
            float(getattr(model, "rating_max", RATING_MAX)),
            dtype,
        )

    @torch.inference_mode()
    def _matches(self, model: torch.nn.Module) -> bool:
        """Whether this kernel computes ``model.head`` (on a seeded random probe)."""
        device = self.out_weight.device
        probe = torch.randn(64, self.width, generator=torch.Generator().manual_seed(0)).to(device)
        x = probe.relu()
        for layer in self.hidden:
            x = torch.addmm(layer.bias, x, layer.weight_t).relu_()
        got = (x @ self.out_weight).add_(self.shift).clamp_(self.lo, self.hi)
        expected = model.head(probe.to(model.global_mean.device)).float().to(device)
        return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-4))

    def flops_per_pair(self, include_elementwise: bool = True) -> int:
        """FLOPs per pair: 2·in·out (+out bias) per linear; with ``include_elementwise`` also the
        first add and every ReLU (1 per element), and the final shift and clamp (3)."""
        flops, width = 0, self.width
        for layer in self.hidden:
            n_in, n_out = layer.weight_t.shape
            flops += 2 * n_in * n_out + (n_out if include_elementwise else 0) * 2  # bias + relu
            width = n_out
        flops += 2 * width
        if include_elementwise:
            flops += 2 * self.width + 3
        return flops

    def buffers(self, pairs: int, device: torch.device) -> list[torch.Tensor]:
        """Work buffers for up to ``pairs`` pairs (one set per thread): the first layer's input,
        every hidden activation, and the output when it is not float32."""
        widths = [self.width] + [layer.weight_t.shape[1] for layer in self.hidden]
        bufs = [torch.empty(pairs, w, dtype=self.dtype, device=device) for w in widths]
        return [*bufs, torch.empty(pairs, dtype=self.dtype, device=device)]

    def user_terms(self, user_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-user parts of the head: ``-P_u`` and the first hidden layer's bias plus ``W_1 P_u``.

        ``relu(P_u + P_b) = max(P_b, -P_u) + P_u``, so ``W_1 relu(P_u + P_b) + b_1 =
        W_1 max(P_b, -P_u) + (W_1 P_u + b_1)``: one elementwise pass per pair instead of two
        (add, relu), and the user's share of the matmul is paid once per user, not per pair.
        """
        first = self.hidden[0]
        user_proj = user_proj.to(self.dtype).contiguous()
        return -user_proj, torch.addmm(first.bias, user_proj, first.weight_t)

    def row(
        self, neg_user: torch.Tensor, bias: torch.Tensor, book_proj: torch.Tensor, out: torch.Tensor, bufs: list
    ) -> None:
        """Raw scores (before ``finish``) of one user against ``book_proj`` [b, h0] into ``out`` [b]."""
        n = book_proj.shape[0]
        x = bufs[0][:n]
        torch.maximum(book_proj, neg_user, out=x)
        for i, (layer, buf) in enumerate(zip(self.hidden, bufs[1:-1], strict=True)):
            z = buf[:n]
            torch.addmm(bias if i == 0 else layer.bias, x, layer.weight_t, out=z)
            z.relu_()
            x = z
        if out.dtype == self.dtype and out.is_contiguous():
            torch.mv(x, self.out_weight, out=out)
        else:
            out.copy_(torch.mv(x, self.out_weight, out=bufs[-1][:n]))

    def tile(self, neg_users: torch.Tensor, bias: torch.Tensor, book_proj: torch.Tensor, out: torch.Tensor) -> None:
        """Raw scores of several users [u] x ``book_proj`` [b] into ``out`` [u, b] with batched
        matmuls (GPUs, and catalogs small enough that per-user rows would be all overhead)."""
        x = torch.maximum(book_proj.unsqueeze(0), neg_users.unsqueeze(1))  # [u, b, h0]
        for i, layer in enumerate(self.hidden):
            if i == 0:
                x = torch.baddbmm(bias.unsqueeze(1), x, layer.weight_t.expand(x.shape[0], *layer.weight_t.shape))
            else:
                x = torch.matmul(x, layer.weight_t).add_(layer.bias)
            x.relu_()
        out.copy_(torch.matmul(x, self.out_weight))

    def finish(self, out: torch.Tensor) -> None:
        """Output bias, global mean and the rating clip, in place."""
        out.add_(self.shift).clamp_(self.lo, self.hi)


class RowKernel(Protocol):
    """A faster evaluation of ``HeadKernel.row`` + ``finish`` for one user against a book block."""

    def row(
        self, book_proj: torch.Tensor, neg_user: torch.Tensor, bias: torch.Tensor, kernel: HeadKernel, out: torch.Tensor
    ) -> None: ...


class AllPairsScorer:
    """Every user of a block against every book of ``scorer``'s book set, from its projections.

    ``precision`` "fp32" equals the evaluation code to float rounding (<1e-5); "bf16" runs the tail
    matmuls in bfloat16 (fast only where the CPU/GPU has bf16 matrix units). ``threads`` > 1 splits
    ``score_projected`` over a thread pool by users; pair it with ``torch.set_num_threads(1)`` so the
    two pools do not oversubscribe the cores. ``block_pairs`` bounds the pairs in flight per thread.
    ``row_kernel``, when set, computes each user's row of final scores instead of the torch ops.
    """

    def __init__(
        self,
        scorer: Scorer,
        *,
        precision: str = "fp32",
        threads: int = 1,
        block_pairs: int = DEFAULT_BLOCK_PAIRS,
    ):
        self.scorer = scorer
        self.device = scorer.device
        self.model = scorer.model
        self.precision = precision
        self.threads = max(1, int(threads))
        self.block_pairs = max(1, int(block_pairs))
        with torch.inference_mode():
            self.kernel = HeadKernel.from_model(self.model, precision)
            if self.kernel is None and precision != "fp32":
                raise ValueError(f"precision {precision!r} needs a RatingMLP tail; this model supports fp32 only")
            dtype = self.kernel.dtype if self.kernel else scorer.book_proj.dtype
            # The book projections in the head kernel's dtype, contiguous: what row kernels read.
            self.kernel_book_proj = scorer.book_proj.to(dtype).contiguous()
        self.row_kernel: RowKernel | None = None
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def n_books(self) -> int:
        return self.scorer.n_books

    def _block_shape(self) -> tuple[int, int]:
        """(users, books) per block: whole catalog rows when they fit in ``block_pairs``."""
        n_b = max(self.n_books, 1)
        if self.block_pairs >= 2 * n_b:
            return self.block_pairs // n_b, n_b
        return 1, min(self.block_pairs, n_b)

    @torch.inference_mode()
    def score_projected(self, user_proj: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [U, B] float32 (on the scorer's device) of projected users against every book."""
        n_u = user_proj.shape[0]
        if out is None:
            out = torch.empty(n_u, self.n_books, dtype=torch.float32, device=self.device)
        if n_u == 0 or self.n_books == 0:
            return out
        if self.kernel is None:
            chunk = max(1, self.block_pairs // n_u)
            book_proj = self.scorer.book_proj
            for start in range(0, self.n_books, chunk):
                books = book_proj[start : start + chunk]
                out[:, start : start + chunk] = self.model.score_matrix(user_proj, books)
            return out
        neg, bias = self.kernel.user_terms(user_proj)
        users_per = 1 if self.row_kernel is not None else self._block_shape()[0]
        ranges = [(u, min(u + users_per, n_u)) for u in range(0, n_u, users_per)]
        if self.row_kernel is not None:

            def work(share: list[tuple[int, int]]) -> None:
                self._kernel_rows(neg, bias, out, share)
        elif users_per == 1:

            def work(share: list[tuple[int, int]]) -> None:
                self._rows(neg, bias, out, share)
        else:

            def work(share: list[tuple[int, int]]) -> None:
                self._tiles(neg, bias, out, share)

        if self.threads == 1 or len(ranges) == 1:
            work(ranges)
        else:
            # One contiguous share of users per thread: each thread reuses its buffers throughout.
            per = math.ceil(len(ranges) / self.threads)
            list(self._executor().map(work, [ranges[i : i + per] for i in range(0, len(ranges), per)]))
        return out

    def _rows(self, neg: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, share: list[tuple[int, int]]) -> None:
        """Per-user rows, books in chunks of ``block_pairs`` (the CPU path for large catalogs)."""
        with torch.inference_mode():
            bufs = self._buffers()
            chunk = self._block_shape()[1]
            for u, _ in share:
                row = out[u]
                for b in range(0, self.n_books, chunk):
                    self.kernel.row(neg[u], bias[u], self.kernel_book_proj[b : b + chunk], row[b : b + chunk], bufs)
                self.kernel.finish(row)

    def _kernel_rows(
        self, neg: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, share: list[tuple[int, int]]
    ) -> None:
        for u, _ in share:
            self.row_kernel.row(self.kernel_book_proj, neg[u], bias[u], self.kernel, out[u])

    def _tiles(self, neg: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, share: list[tuple[int, int]]) -> None:
        with torch.inference_mode():
            for lo, hi in share:
                self.kernel.tile(neg[lo:hi], bias[lo:hi], self.kernel_book_proj, out[lo:hi])
                self.kernel.finish(out[lo:hi])

    def _buffers(self) -> list[torch.Tensor]:
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = self.kernel.buffers(self._block_shape()[1], self.device)
        return bufs

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # OpenMP's thread count is per calling thread: new threads would default to every core and
            # oversubscribe, so they inherit the creating thread's setting.
            n = torch.get_num_threads()
            self._pool = ThreadPoolExecutor(self.threads, "scorer", initializer=torch.set_num_threads, initargs=(n,))
        return self._pool

    @torch.inference_mode()
    def score_all(self, user_feats: torch.Tensor) -> torch.Tensor:
        """Scores [U, B] (CPU) of every user against every book of the set."""
        return self.score_projected(self.scorer.project_users(user_feats)).float().cpu()

    @torch.inference_mode()
    def top_k(
        self, user_feats: torch.Tensor, k: int, exclude: list[np.ndarray] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` (ratings, book-set rows) per user by predicted rating; ``exclude[i]`` lists the
        rows user i must not get. Rows are -1 where fewer than ``k`` books remain."""
        scores = self.score_all(user_feats)
        return top_k_excluding(scores, exclude, k)
