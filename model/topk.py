"""Top-k per row of a score matrix with excluded columns: the scorer's lists, the retrieval's
exclusions and the evaluation's baselines all go through these two functions.

The contract (:func:`top_k_excluding`): best first, ties broken by the lower column, excluded
entries and fewer than k remaining columns padded with -1 (value -inf); the scores are overwritten
at the excluded entries instead of copied, since a block of users x books is the largest array of
the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

# Scores per chunk of rows turned into sortable keys (int64), so the extra memory is bounded.
KEY_CHUNK = 1 << 22


def exclusion_coords(
    exclude: Sequence[Any] | sp.spmatrix, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every excluded entry: ``exclude`` is a sequence of index arrays (row i's
    columns) or a scipy sparse matrix whose stored entries are the excluded ones."""
    if sp.issparse(exclude):
        csr = sp.csr_matrix(exclude)
        rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
        cols = csr.indices.astype(np.int64)
    else:
        parts = [np.asarray(e, np.int64).ravel() for e in exclude]
        rows = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
        cols = np.concatenate(parts) if len(rows) else np.zeros(0, np.int64)
    return torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)


def _sortable_keys(s: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like the float32 scores ``s`` [R, B], ties ordered by lower column first.

    The float bits are mapped to an order-preserving int32 (negative floats have their magnitude bits
    flipped) in the high half; the low half holds ``B - 1 - column``, so every key is unique and a
    plain top-k over the keys is deterministic.
    """
    bits = (s + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0, so the two zeros tie
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    col = torch.arange(s.shape[1] - 1, -1, -1, dtype=torch.int64, device=s.device)
    return (bits.to(torch.int64) << 32) + col


def top_k_excluding(
    scores: torch.Tensor | np.ndarray, exclude: Sequence[Any] | sp.spmatrix | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (values, columns) per row of ``scores`` [U, B], best first, never an excluded column.

    ``exclude``: None, a sequence of U index arrays, or a scipy sparse [U, B] whose stored entries are
    the excluded ones. Ties go to the lower column, so the lists are deterministic. Returns float32
    values and int64 columns, both [U, k]; where fewer than ``k`` columns remain (or scores are -inf)
    the tail is -1 with value -inf. Float32 scores (a tensor, or a numpy array, which is shared) are
    overwritten with -inf at the excluded entries; other dtypes are converted first. NaN scores, an
    empty matrix and ``k < 1`` are rejected.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s = torch.as_tensor(scores)
    if s.dtype != torch.float32:
        s = s.to(torch.float32)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"empty input: scores must be a non-empty 2-D [users, items] array, got {tuple(s.shape)}")
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_rows, n_cols = s.shape
    if exclude is not None:
        given = exclude.shape[0] if sp.issparse(exclude) else len(exclude)
        if given != n_rows:
            raise ValueError(f"exclude has {given} rows, scores has {n_rows}")
        rows, cols = exclusion_coords(exclude, s.device)
        if len(cols) and (int(cols.min()) < 0 or int(cols.max()) >= n_cols):
            raise ValueError(f"exclude holds item indices outside 0..{n_cols - 1}")
        s[rows, cols] = -math.inf

    kk = min(k, n_cols)
    excluded_key = int(_sortable_keys(torch.tensor([[-math.inf]]))[0, 0] >> 32)
    columns = torch.full((n_rows, k), -1, dtype=torch.int64, device=s.device)
    step = max(1, KEY_CHUNK // n_cols)
    for a in range(0, n_rows, step):
        keys = torch.topk(_sortable_keys(s[a : a + step]), kk, dim=1, sorted=True).values
        found = (n_cols - 1) - (keys & 0xFFFFFFFF)
        found[(keys >> 32) == excluded_key] = -1
        columns[a : a + step, :kk] = found
    values = s.gather(1, columns.clamp(min=0)).masked_fill(columns < 0, -math.inf)
    return values, columns
