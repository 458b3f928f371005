"""Scoring with a trained model: aligned pairs, and blocks of users against the whole catalog.

The TorchServe handler and the Beam job both score through this class, with the same model file
and the same catalog features, so their numbers equal the evaluation's.

All-pairs scoring is the hot path (one batch job scores ~10^9 pairs), so ``score_all`` does not
call the model per pair. The first layer is split (``W [u; b] = W_u u + W_b b``), so users and books
are projected once with the model's own ``project_users`` / ``project_books``; per pair only the head
is left: ``relu(P_u + P_b)`` then the tail MLP. ``HeadKernel`` evaluates that head from weights
dequantized once, per user over cache-sized chunks of books with preallocated buffers: one
elementwise ``maximum`` (the user's part of the first tail layer moves into a per-user bias), one
``addmm`` + ReLU per hidden layer and an ``mv`` straight into the output row; optionally on several
threads (torch ops release the GIL). Models whose tail it does not recognise fall back to their own
``score_matrix``.

``kernel="native"`` (or "auto") evaluates the same head with a small AVX2/FMA C kernel compiled once
per machine and head shape (``NativeHead``: the system C compiler, loaded through ctypes, which
releases the GIL): the first tail layer's matmul runs register-blocked with the ``maximum`` folded
in and the output unit fused, so no activation leaves L1. "auto" falls back to the torch ops when
there is no compiler, no AVX2/FMA, or the tail is not one hidden layer.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from model.network import RATING_MAX, RATING_MIN

log = logging.getLogger("bookrec.scoring")

PRECISIONS = ("fp32", "bf16")
# Pairs per block: H [pairs, h0] plus the hidden activations stay within a core's L2/L3 share;
# measured best on a 2-core AVX2 EPYC for h0=96 (1024..16384 tried, see bench/BATCH_RESULTS.md).
DEFAULT_BLOCK_PAIRS = 4096
KERNELS = ("torch", "native", "auto")


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
        if last_w.shape[0] != 1 or len(linears) < 2:
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


# The native head: one user against many books. Books are taken in tiles of T whose first-layer
# inputs max(P_b, -P_u) are built once in L1; each pass computes 8*NV hidden units for R books at a
# time (R*NV accumulators + NV weight registers + 1 broadcast <= 16 AVX2 registers), then folds the
# ReLU and the output unit into a per-book partial sum. H0, H1, NV are compile-time constants.
_NATIVE_SOURCE = r"""
#include <immintrin.h>
#define R 4
#define T 32
#define PASS (8 * NV)
static inline float hsum(__m256 s) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    q = _mm_hadd_ps(q, q); q = _mm_hadd_ps(q, q);
    return _mm_cvtss_f32(q);
}
void head_rows(const float* restrict pb, long nb, const float* restrict negu, const float* restrict bias,
               const float* restrict w1t, const float* restrict w2, float shift, float lo, float hi,
               float* restrict out) {
    float h[T * H0] __attribute__((aligned(32)));
    float part[T];
    for (long b0 = 0; b0 < nb; b0 += T) {
        long nt = nb - b0 < T ? nb - b0 : T;
        for (long r = 0; r < nt; r++) {
            for (int k = 0; k < H0; k += 8)
                _mm256_store_ps(h + r * H0 + k,
                                _mm256_max_ps(_mm256_loadu_ps(pb + (b0 + r) * H0 + k), _mm256_loadu_ps(negu + k)));
            part[r] = shift;
        }
        for (long r = nt; r < (nt + R - 1) / R * R; r++)
            for (int k = 0; k < H0; k++) h[r * H0 + k] = 0.0f;
        for (int o = 0; o < H1; o += PASS) {
            __m256 vb[NV], vw[NV];
            for (int j = 0; j < NV; j++) {
                vb[j] = _mm256_loadu_ps(bias + o + 8 * j);
                vw[j] = _mm256_loadu_ps(w2 + o + 8 * j);
            }
            for (long r = 0; r < nt; r += R) {
                __m256 acc[R][NV];
                for (int i = 0; i < R; i++)
                    for (int j = 0; j < NV; j++) acc[i][j] = vb[j];
                const float* hr = h + r * H0;
                for (int k = 0; k < H0; k++) {
                    __m256 w[NV];
                    for (int j = 0; j < NV; j++) w[j] = _mm256_loadu_ps(w1t + k * H1 + o + 8 * j);
                    for (int i = 0; i < R; i++) {
                        __m256 x = _mm256_broadcast_ss(hr + i * H0 + k);
                        for (int j = 0; j < NV; j++) acc[i][j] = _mm256_fmadd_ps(x, w[j], acc[i][j]);
                    }
                }
                for (int i = 0; i < R && r + i < nt; i++) {
                    __m256 s = _mm256_mul_ps(_mm256_max_ps(acc[i][0], _mm256_setzero_ps()), vw[0]);
                    for (int j = 1; j < NV; j++)
                        s = _mm256_fmadd_ps(_mm256_max_ps(acc[i][j], _mm256_setzero_ps()), vw[j], s);
                    part[r + i] += hsum(s);
                }
            }
        }
        for (long r = 0; r < nt; r++) {
            float v = part[r];
            out[b0 + r] = v < lo ? lo : (v > hi ? hi : v);
        }
    }
}
"""


_NATIVE: dict[tuple[int, int], NativeHead | None] = {}
_NATIVE_LOCK = threading.Lock()


class NativeHead:
    """The compiled head kernel for one (h0, h1) shape, or None from ``build`` when unavailable."""

    def __init__(self, lib: ctypes.CDLL):
        self._fn = lib.head_rows
        ptr, f32 = ctypes.c_void_p, ctypes.c_float
        self._fn.argtypes = [ptr, ctypes.c_long, ptr, ptr, ptr, ptr, f32, f32, f32, ptr]
        self._fn.restype = None

    @classmethod
    def build(cls, h0: int, h1: int) -> NativeHead | None:
        """Compile (once per machine, cached on disk) and load the kernel; None when this machine or
        shape cannot have it."""
        key = (h0, h1)
        with _NATIVE_LOCK:
            if key not in _NATIVE:
                _NATIVE[key] = cls._compile(h0, h1)
            return _NATIVE[key]

    @staticmethod
    def _compile(h0: int, h1: int) -> NativeHead | None:
        if h0 % 8 or h1 % 8 or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            return None
        nv = 3 if (h1 // 8) % 3 == 0 else 2 if (h1 // 8) % 2 == 0 else 1
        flags = ["-O3", "-mavx2", "-mfma", "-shared", "-fPIC", f"-DH0={h0}", f"-DH1={h1}", f"-DNV={nv}"]
        digest = hashlib.sha256((_NATIVE_SOURCE + " ".join(flags) + compiler).encode()).hexdigest()[:16]
        root = Path(os.environ.get("BOOKREC_KERNEL_CACHE", Path(tempfile.gettempdir()) / "bookrec-kernels"))
        lib = root / f"head-{digest}.so"
        try:
            if not lib.exists():
                root.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=root) as tmp:
                    src = Path(tmp) / "head.c"
                    src.write_text(_NATIVE_SOURCE)
                    subprocess.run(
                        [compiler, *flags, str(src), "-o", str(Path(tmp) / "head.so")],
                        check=True,
                        capture_output=True,
                        timeout=120,
                    )
                    os.replace(Path(tmp) / "head.so", lib)  # atomic: concurrent workers never see half a file
            return NativeHead(ctypes.CDLL(str(lib)))
        except (OSError, subprocess.SubprocessError) as err:
            log.warning("native head kernel unavailable (%s); using torch ops", err)
            return None

    def row(
        self, book_proj: torch.Tensor, neg_user: torch.Tensor, bias: torch.Tensor, kernel: HeadKernel, out: torch.Tensor
    ) -> None:
        """Final scores of one user against every row of ``book_proj`` (contiguous float32) into ``out``."""
        layer = kernel.hidden[0]
        self._fn(
            book_proj.data_ptr(),
            book_proj.shape[0],
            neg_user.data_ptr(),
            bias.data_ptr(),
            layer.weight_t.data_ptr(),
            kernel.out_weight.data_ptr(),
            kernel.shift,
            kernel.lo,
            kernel.hi,
            out.data_ptr(),
        )


class Scorer:
    """Wraps a RatingMLP (eager or TorchScript) with the catalog's book projections precomputed.

    ``precision`` "fp32" equals the evaluation code to float rounding (<1e-5); "bf16" runs the tail
    matmuls in bfloat16 (fast only where the CPU/GPU has bf16 matrix units). ``kernel`` picks the
    all-pairs head: "torch" ops (default), "native" (the compiled AVX2 kernel, error if unavailable)
    or "auto" (native when available). ``threads`` > 1 splits ``score_all`` over a thread pool by
    users; pair it with ``torch.set_num_threads(1)`` so the two pools do not oversubscribe the cores.
    ``block_pairs`` bounds the pairs in flight per thread (torch path).
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
        kernel: str = "torch",
    ):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
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
            dtype = self.kernel.dtype if self.kernel else self.book_proj.dtype
            self._book_proj = self.book_proj.to(dtype).contiguous()
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self.native = self._native(kernel)
        if kernel == "native" and self.native is None:
            raise ValueError(
                "kernel='native' is unavailable here (needs CPU fp32, one hidden tail layer, "
                "AVX2/FMA and a C compiler); use 'auto' to fall back to torch ops"
            )

    def _native(self, kernel: str) -> NativeHead | None:
        """The compiled head when asked for and usable, after checking it against the torch path."""
        usable = (
            kernel != "torch"
            and self.kernel is not None
            and self.device.type == "cpu"
            and self.kernel.dtype == torch.float32
            and len(self.kernel.hidden) == 1
        )
        native = NativeHead.build(self.kernel.width, self.kernel.hidden[0].weight_t.shape[1]) if usable else None
        if native is None or self.n_books == 0:
            return native
        with torch.inference_mode():  # guard against a miscompiled kernel: compare on a small sample
            books = self._book_proj[:256].contiguous()
            probe = torch.stack([books[0], -books[-1]])
            neg, bias = self.kernel.user_terms(probe)
            expected = torch.empty(2, books.shape[0])
            bufs = self.kernel.buffers(books.shape[0], self.device)
            got = torch.empty(2, books.shape[0])
            for u in range(2):
                self.kernel.row(neg[u], bias[u], books, expected[u], bufs)
                self.kernel.finish(expected[u])
                native.row(books, neg[u], bias[u], self.kernel, got[u])
        if not torch.allclose(got, expected, rtol=0, atol=1e-4):
            log.warning("native head kernel disagrees with torch ops; using torch ops")
            return None
        return native

    @property
    def n_books(self) -> int:
        return int(self.book_proj.shape[0])

    @torch.inference_mode()
    def rate(self, user_feats: torch.Tensor, book_feats: torch.Tensor) -> torch.Tensor:
        """Ratings of aligned pairs [N] (user_feats [N, Du], book_feats [N, Db])."""
        return self.model(user_feats.to(self.device), book_feats.to(self.device)).float().cpu()

    @torch.inference_mode()
    def project_users(self, user_feats: torch.Tensor) -> torch.Tensor:
        """First-layer user projections [U, h0] (the model's own code, as in evaluation)."""
        return self.model.project_users(user_feats.to(self.device))

    @torch.inference_mode()
    def rate_rows(self, user_proj: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Ratings [U, N] of each projected user against its own N book-set rows (``rows`` [U, N]):
        the rerank of retrieved candidates, ``head(P_u + P_b)`` as in ``RatingMLP.forward``."""
        return self.model.head(user_proj.unsqueeze(1) + self.book_proj[rows]).float()

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
            for start in range(0, self.n_books, chunk):
                books = self.book_proj[start : start + chunk]
                out[:, start : start + chunk] = self.model.score_matrix(user_proj, books)
            return out
        neg, bias = self.kernel.user_terms(user_proj)
        users_per = 1 if self.native is not None else self._block_shape()[0]
        ranges = [(u, min(u + users_per, n_u)) for u in range(0, n_u, users_per)]
        if self.native is not None:

            def work(share: list[tuple[int, int]]) -> None:
                self._native_rows(neg, bias, out, share)
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
                    self.kernel.row(neg[u], bias[u], self._book_proj[b : b + chunk], row[b : b + chunk], bufs)
                self.kernel.finish(row)

    def _native_rows(
        self, neg: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, share: list[tuple[int, int]]
    ) -> None:
        for u, _ in share:
            self.native.row(self._book_proj, neg[u], bias[u], self.kernel, out[u])

    def _tiles(self, neg: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, share: list[tuple[int, int]]) -> None:
        with torch.inference_mode():
            for lo, hi in share:
                self.kernel.tile(neg[lo:hi], bias[lo:hi], self._book_proj, out[lo:hi])
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
    def score_all(self, user_feats: torch.Tensor, book_chunk: int | None = None) -> torch.Tensor:
        """Scores [U, B] of every user against every catalog book.

        ``book_chunk`` is accepted for compatibility; blocks are sized by ``block_pairs``."""
        return self.score_projected(self.project_users(user_feats)).float().cpu()

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
