"""The batch job's compiled head kernel: one user against every book of the set, in AVX2/FMA C.

``AllPairsScorer`` (batch/all_pairs.py) evaluates the rating head with torch ops; the all-pairs batch
job scores ~10^9 pairs, so it plugs in this kernel as the scorer's ``row_kernel`` (``attach``). It is
compiled once per machine and head shape with the system C compiler and loaded through ctypes (which
releases the GIL): the first tail layer's matmul runs register-blocked with the ``maximum`` folded in
and the output unit fused, so no activation leaves L1. Serving never needs it, so it lives here.

``kernel="native"`` demands it; "auto" falls back to the torch ops when there is no compiler, no
AVX2/FMA, the head is not one hidden layer, or the compiled kernel disagrees with the torch ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from batch.all_pairs import AllPairsScorer, HeadKernel

log = logging.getLogger("bookrec.batch")

KERNELS = ("torch", "native", "auto")

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


def attach(scorer: AllPairsScorer, kernel: str) -> AllPairsScorer:
    """Give ``scorer`` the compiled head as its row kernel: "native" (error when unavailable),
    "auto" (when available) or "torch" (never)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    scorer.row_kernel = _checked(scorer) if kernel != "torch" else None
    if kernel == "native" and scorer.row_kernel is None:
        raise ValueError(
            "kernel='native' is unavailable here (needs CPU fp32, one hidden tail layer, "
            "AVX2/FMA and a C compiler); use 'auto' to fall back to torch ops"
        )
    return scorer


def _checked(scorer: AllPairsScorer) -> NativeHead | None:
    """The compiled head for the scorer's shape, after checking it against the torch path."""
    kernel = scorer.kernel
    usable = (
        kernel is not None and scorer.device.type == "cpu" and kernel.dtype == torch.float32 and len(kernel.hidden) == 1
    )
    native = NativeHead.build(kernel.width, kernel.hidden[0].weight_t.shape[1]) if usable else None
    if native is None or scorer.n_books == 0:
        return native
    with torch.inference_mode():  # guard against a miscompiled kernel: compare on a small sample
        books = scorer.kernel_book_proj[:256].contiguous()
        probe = torch.stack([books[0], -books[-1]])
        neg, bias = kernel.user_terms(probe)
        expected = torch.empty(2, books.shape[0])
        bufs = kernel.buffers(books.shape[0], scorer.device)
        got = torch.empty(2, books.shape[0])
        for u in range(2):
            kernel.row(neg[u], bias[u], books, expected[u], bufs)
            kernel.finish(expected[u])
            native.row(books, neg[u], bias[u], kernel, got[u])
    if not torch.allclose(got, expected, rtol=0, atol=1e-4):
        log.warning("native head kernel disagrees with torch ops; using torch ops")
        return None
    return native
