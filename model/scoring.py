"""Scoring with a trained model: aligned pairs, and blocks of users against the whole catalog.

The TorchServe handler and the Beam job both score through this class, with the same model file
and the same catalog features, so their numbers equal the evaluation's.

All-pairs scoring is the hot path (one batch job scores ~10^9 pairs), so ``score_all`` does not
call the model per pair. The first layer is split (``W [u; b] = W_u u + W_b b``), so users and books
are projected once with the model's own ``project_users`` / ``project_books``; per pair only the head
is left: ``relu(P_u + P_b)`` then the tail MLP. ``HeadKernel`` evaluates that head from weights
dequantized once, in cache-sized blocks of pairs with preallocated buffers, one ``addmm`` per hidden
layer and an ``mv`` for the output unit; optionally on several threads (torch ops release the GIL).
Models whose tail it does not recognise fall back to their own ``score_matrix``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

RATING_MIN = 1.0
RATING_MAX = 10.0
PRECISIONS = ("fp32", "bf16")
# Pairs per block: H [pairs, h0] plus the hidden activations stay within a core's L2/L3 share;
# measured best on a 2-core AVX2 EPYC for h0=96 (1024..16384 tried, see bench/BATCH_RESULTS.md).
DEFAULT_BLOCK_PAIRS = 4096


def _kind(module: torch.nn.Module) -> str:
    """Class name of an eager or TorchScript submodule."""
    return getattr(module, "original_name", type(module).__name__)


@dataclass
class _Layer:
    weight_t: torch.Tensor  # [in, out], contiguous, compute dtype
    bias: torch.Tensor  # [out], compute dtype


class HeadKernel:
    """The tail MLP on ``relu(P_u + P_b)`` for blocks of pairs, from weights dequantized once.

    Supports a tail of ``ReLU, [Dropout], Linear, ..., ReLU, [Dropout], Linear(·, 1)`` with
    ``nn.Linear`` or ``Int8Linear`` layers (eager or TorchScript), i.e. what ``RatingMLP`` builds.
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
        """The kernel for ``model``'s tail, or None when the tail has a layout it does not know."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        tail = getattr(model, "tail", None)
        if tail is None or not hasattr(model, "global_mean"):
            return None
        ops: list[str | tuple[torch.Tensor, torch.Tensor]] = []
        for child in tail.children():
            kind = _kind(child)
            if kind == "ReLU":
                ops.append("relu")
            elif kind == "Dropout":
                continue  # identity in eval mode
            elif kind == "Linear":
                bias = child.bias if child.bias is not None else torch.zeros(child.weight.shape[0])
                ops.append((child.weight.detach().float(), bias.detach().float()))
            elif kind == "Int8Linear":
                # Exactly Int8Linear.forward's dequantization, done once instead of per call.
                weight = child.weight_q.to(torch.float32) * child.scale.to(torch.float32)[:, None]
                ops.append((weight, child.bias.detach().float()))
            else:
                return None
        # Expected: relu, linear, relu, linear, ..., linear(out=1).
        if len(ops) < 2 or len(ops) % 2 or any(op != "relu" for op in ops[0::2]) or "relu" in ops[1::2]:
            return None
        linears = ops[1::2]
        last_w, last_b = linears[-1]
        if last_w.shape[0] != 1:
            return None
        hidden = [_Layer(w.t().contiguous().to(dtype), b.to(dtype)) for w, b in linears[:-1]]
        return cls(
            hidden,
            last_w[0].contiguous().to(dtype),
            float(last_b[0]),
            float(model.global_mean),
            float(getattr(model, "rating_min", RATING_MIN)),
            float(getattr(model, "rating_max", RATING_MAX)),
            dtype,
        )

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

    def buffers(self, pairs: int) -> list[torch.Tensor]:
        """Work buffers for blocks of up to ``pairs`` pairs (one set per thread)."""
        widths = [self.width] + [layer.weight_t.shape[1] for layer in self.hidden]
        return [torch.empty(pairs, w, dtype=self.dtype) for w in widths] + [torch.empty(pairs, dtype=self.dtype)]

    def block(self, user_proj: torch.Tensor, book_proj: torch.Tensor, out: torch.Tensor, bufs: list[torch.Tensor]):
        """Scores of ``user_proj`` [u, h0] x ``book_proj`` [b, h0] into ``out`` [u, b] (any strides)."""
        n_u, n_b = user_proj.shape[0], book_proj.shape[0]
        n = n_u * n_b
        x = bufs[0][:n]
        torch.add(user_proj.unsqueeze(1), book_proj.unsqueeze(0), out=x.view(n_u, n_b, -1))
        x.relu_()
        for layer, buf in zip(self.hidden, bufs[1:-1], strict=False):
            z = buf[:n]
            torch.addmm(layer.bias, x, layer.weight_t, out=z)
            z.relu_()
            x = z
        s = bufs[-1][:n]
        torch.mv(x, self.out_weight, out=s)
        out.copy_(s.view(n_u, n_b))
        out.add_(self.shift).clamp_(self.lo, self.hi)


class Scorer:
    """Wraps a RatingMLP (eager or TorchScript) with the catalog's book projections precomputed.

    ``precision`` "fp32" equals the evaluation code to float rounding (<1e-5); "bf16" runs the tail
    matmuls in bfloat16 (fast only where the CPU/GPU has bf16 matrix units). ``threads`` > 1 splits
    ``score_all`` over a thread pool; pair it with ``torch.set_num_threads(1)`` so the pools do not
    oversubscribe the cores.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        book_feats: torch.Tensor,
        device: str | torch.device = "cpu",
        *,
        precision: str = "fp32",
        threads: int = 1,
        block_pairs: int = DEFAULT_BLOCK_PAIRS,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.book_feats = book_feats.to(self.device)
        self.precision = precision
        self.threads = max(1, int(threads))
        self.block_pairs = max(1, int(block_pairs))
        with torch.inference_mode():
            self.book_proj = self.model.project_books(self.book_feats)
            self.kernel = HeadKernel.from_model(self.model, precision)
        if self.kernel is None and precision != "fp32":
            raise ValueError(f"precision {precision!r} needs a RatingMLP tail; this model supports fp32 only")
        self._book_proj_c = self.book_proj.to(self.kernel.dtype).contiguous() if self.kernel else self.book_proj
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def n_books(self) -> int:
        return int(self.book_proj.shape[0])

    @torch.inference_mode()
    def rate(self, user_feats: torch.Tensor, book_feats: torch.Tensor) -> torch.Tensor:
        """Ratings of aligned pairs [N] (user_feats [N, Du], book_feats [N, Db])."""
        return self.model(user_feats.to(self.device), book_feats.to(self.device)).float().cpu()

    @torch.inference_mode()
    def project_users(self, user_feats: torch.Tensor) -> torch.Tensor:
        """First-layer user projections [U, h0] (the model's own code, so equal to evaluation)."""
        return self.model.project_users(user_feats.to(self.device))

    @torch.inference_mode()
    def score_projected(self, user_proj: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [U, B] float32 of projected users against every catalog book."""
        n_u = user_proj.shape[0]
        if out is None:
            out = torch.empty(n_u, self.n_books, dtype=torch.float32, device=self.device)
        if self.kernel is None:
            chunk = max(1, self.block_pairs // max(n_u, 1))
            for start in range(0, self.n_books, chunk):
                out[:, start : start + chunk] = self.model.score_matrix(
                    user_proj, self.book_proj[start : start + chunk]
                )
            return out
        user_proj = user_proj.to(self.kernel.dtype)
        tasks = list(self._tasks(n_u))
        if self.threads == 1 or len(tasks) == 1:
            bufs = self._buffers()
            for u, b in tasks:
                self._run(user_proj, out, u, b, bufs)
        else:
            # One contiguous share of tasks per thread: fewer hand-offs, each thread keeps its buffers.
            per = math.ceil(len(tasks) / self.threads)
            shares = [tasks[i : i + per] for i in range(0, len(tasks), per)]
            pool = self._executor()
            list(pool.map(lambda share: self._run_share(user_proj, out, share), shares))
        return out

    def _block_shape(self) -> tuple[int, int]:
        """(users, books) per block: whole catalog rows when they fit in ``block_pairs``."""
        n_b = max(self.n_books, 1)
        if self.block_pairs >= n_b:
            return self.block_pairs // n_b, n_b
        return 1, self.block_pairs

    def _tasks(self, n_u: int) -> Iterator[tuple[slice, slice]]:
        """(user slice, book slice) blocks of about ``block_pairs`` pairs, books innermost."""
        users_per, books_per = self._block_shape()
        for u in range(0, n_u, users_per):
            for b in range(0, self.n_books, books_per):
                yield slice(u, min(u + users_per, n_u)), slice(b, min(b + books_per, self.n_books))

    def _buffers(self) -> list[torch.Tensor]:
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            users_per, books_per = self._block_shape()
            bufs = self._local.bufs = [b.to(self.device) for b in self.kernel.buffers(users_per * books_per)]
        return bufs

    def _run(self, user_proj: torch.Tensor, out: torch.Tensor, u: slice, b: slice, bufs: list[torch.Tensor]) -> None:
        self.kernel.block(user_proj[u], self._book_proj_c[b], out[u, b], bufs)

    def _run_share(self, user_proj: torch.Tensor, out: torch.Tensor, share: list[tuple[slice, slice]]) -> None:
        with torch.inference_mode():
            bufs = self._buffers()
            for u, b in share:
                self._run(user_proj, out, u, b, bufs)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # OpenMP's thread count is per calling thread: new threads would default to every core and
            # oversubscribe, so they inherit the creating thread's setting.
            n = torch.get_num_threads()
            self._pool = ThreadPoolExecutor(self.threads, "scorer", initializer=torch.set_num_threads, initargs=(n,))
        return self._pool

    @torch.inference_mode()
    def score_all(self, user_feats: torch.Tensor, book_chunk: int | None = None) -> torch.Tensor:
        """Scores [U, B] of every user against every catalog book.

        ``book_chunk`` is accepted for compatibility; blocks are sized by ``block_pairs``."""
        out = self.score_projected(self.project_users(user_feats))
        return out.float().cpu()

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
