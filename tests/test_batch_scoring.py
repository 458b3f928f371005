"""The all-pairs scorer (``batch.all_pairs``): the fast head kernel equals the model's own forward for
every shipped variant, whatever the block size or thread count; unknown tails fall back to the model.
The batch job's compiled head (``batch.native_head``) equals it too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from batch.all_pairs import AllPairsScorer, HeadKernel
from batch.native_head import attach
from model.catalog import Catalog
from model.checkpoint import load_checkpoint
from model.network import RatingMLP
from model.scoring import Scorer


@pytest.fixture(scope="module")
def catalog(tiny_run: Path) -> Catalog:
    return Catalog.load(tiny_run)


def variants(run: Path) -> dict[str, nn.Module]:
    return {
        "scripted": torch.jit.load(str(run / "model_scripted.pt")),
        "fp32": load_checkpoint(run / "model_fp32.pt"),
        "pruned": load_checkpoint(run / "model_pruned.pt"),
        "int8": load_checkpoint(run / "model_int8.pt"),
    }


def all_pairs(model: nn.Module, books: torch.Tensor, **options) -> AllPairsScorer:
    """The all-pairs scorer over the book set ``books``, as the batch job builds it."""
    return AllPairsScorer(Scorer(model, books), **options)


def forward_all(model: nn.Module, users: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Reference: the model's forward on every aligned (user, book) pair."""
    u = users.repeat_interleave(books.shape[0], 0)
    b = books.repeat(users.shape[0], 1)
    with torch.no_grad():
        return model(u, b).reshape(users.shape[0], books.shape[0])


@pytest.mark.parametrize("name", ["scripted", "fp32", "pruned", "int8"])
def test_score_all_equals_forward(tiny_run: Path, catalog: Catalog, name: str) -> None:
    model = variants(tiny_run)[name]
    scorer = all_pairs(model, catalog.book_feats)
    assert scorer.kernel is not None, "RatingMLP tails must take the fast path"
    users = catalog.user_feats[:37]
    expected = forward_all(model, users, catalog.book_feats)
    got = scorer.score_all(users)
    assert got.shape == (37, len(catalog.books)) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_block_size_and_threads_do_not_change_scores(tiny_run: Path, catalog: Catalog) -> None:
    model = variants(tiny_run)["scripted"]
    users = catalog.user_feats[:50]
    reference = all_pairs(model, catalog.book_feats).score_all(users)
    for block_pairs in (7, 64, 1000, 1 << 16):
        for threads in (1, 3):
            got = all_pairs(model, catalog.book_feats, threads=threads, block_pairs=block_pairs).score_all(users)
            torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)


def test_unknown_tail_falls_back_to_the_models_own_code(catalog: Catalog) -> None:
    torch.manual_seed(0)
    model = RatingMLP(catalog.user_feats.shape[1], catalog.book_feats.shape[1], [16, 8]).eval()
    model.tail[0] = nn.GELU()  # not a layout the kernel knows
    scorer = all_pairs(model, catalog.book_feats, block_pairs=100)
    assert scorer.kernel is None
    users = catalog.user_feats[:5]
    expected = forward_all(model, users, catalog.book_feats)
    torch.testing.assert_close(scorer.score_all(users), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="fp32 only"):
        all_pairs(model, catalog.book_feats, precision="bf16")


def test_bf16_mode_is_close(tiny_run: Path, catalog: Catalog) -> None:
    model = variants(tiny_run)["scripted"]
    users = catalog.user_feats[:8]
    exact = all_pairs(model, catalog.book_feats).score_all(users)
    low = all_pairs(model, catalog.book_feats, precision="bf16").score_all(users)
    assert low.dtype == torch.float32
    assert (low - exact).abs().max() < 0.1


def test_top_k_excludes_rows(tiny_run: Path, catalog: Catalog) -> None:
    scorer = all_pairs(variants(tiny_run)["scripted"], catalog.book_feats)
    users = catalog.user_feats[:3]
    scores = scorer.score_all(users)
    best = scores.argmax(1)
    values, rows = scorer.top_k(users, 4, exclude=[best[:1], torch.tensor([], dtype=torch.long), best[2:3]])
    assert rows.shape == (3, 4)
    assert rows[1, 0] == best[1] and rows[0, 0] != best[0] and rows[2, 0] != best[2]
    torch.testing.assert_close(values[1], scores[1].topk(4).values)


def test_flop_convention(tiny_run: Path) -> None:
    model = variants(tiny_run)["int8"]
    kernel = HeadKernel.from_model(model)
    shapes = model.shapes()
    h0, h1 = shapes["user_in"][0], shapes["tail.0"][0]
    assert shapes["tail.1"] == [1, h1]
    assert kernel.flops_per_pair(include_elementwise=False) == 2 * h0 * h1 + 2 * h1
    assert kernel.flops_per_pair() == 2 * h0 * h1 + 2 * h1 + 2 * h0 + 2 * h1 + 3


@pytest.mark.parametrize("name", ["scripted", "fp32"])
def test_native_kernel_equals_forward(tiny_run: Path, catalog: Catalog, name: str) -> None:
    model = variants(tiny_run)[name]
    scorer = attach(all_pairs(model, catalog.book_feats, threads=2), "auto")
    if scorer.row_kernel is None:
        pytest.skip("no C compiler or no AVX2/FMA on this machine (auto runs the torch ops)")
    users = catalog.user_feats[:41]
    expected = forward_all(model, users, catalog.book_feats)
    torch.testing.assert_close(scorer.score_all(users), expected, rtol=0, atol=1e-5)
    books = catalog.book_feats[:5]  # fewer books than one tile of the kernel
    small = attach(all_pairs(model, books), "native")
    torch.testing.assert_close(small.score_all(users), forward_all(model, users, books), rtol=0, atol=1e-5)


def test_native_kernel_refuses_what_it_cannot_do(tiny_run: Path, catalog: Catalog) -> None:
    model = variants(tiny_run)["scripted"]
    with pytest.raises(ValueError, match="unavailable"):
        attach(all_pairs(model, catalog.book_feats, precision="bf16"), "native")
    assert attach(all_pairs(model, catalog.book_feats, precision="bf16"), "auto").row_kernel is None
    with pytest.raises(ValueError, match="kernel must be one of"):
        attach(all_pairs(model, catalog.book_feats), "fast")


def test_auto_falls_back_where_the_native_kernel_cannot_go(tiny_run: Path, catalog: Catalog) -> None:
    model = variants(tiny_run)["int8"]  # pruned tail: 12 hidden units, not a multiple of 8
    scorer = attach(all_pairs(model, catalog.book_feats), "auto")
    assert scorer.row_kernel is None and scorer.kernel is not None
    users = catalog.user_feats[:9]
    expected = forward_all(model, users, catalog.book_feats)
    torch.testing.assert_close(scorer.score_all(users), expected, rtol=0, atol=1e-5)
