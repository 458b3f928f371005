"""The MLP: shapes, learning, pruning, int8, TorchScript agreement, checkpoints."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.network import Int8Linear, RatingMLP, quantize_int8
from train.rating.compress import prune_structured, script_model


def _model(seed: int = 0) -> RatingMLP:
    torch.manual_seed(seed)
    return RatingMLP(user_dim=12, book_dim=7, hidden=[16, 8], dropout=0.0, global_mean=7.0).eval()


def _inputs(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randn(n, 7, generator=g)


def test_shapes_and_rating_range():
    model = _model()
    users, books = _inputs()
    out = model(users, books)
    assert out.shape == (32,)
    assert model.project_users(users).shape == (32, 16) and model.project_books(books).shape == (32, 16)
    assert model.shapes() == {"user_in": [16, 12], "book_in": [16, 7], "tail.0": [8, 16], "tail.1": [1, 8]}
    with torch.no_grad():
        model.tail[-1].bias.fill_(100.0)
    assert torch.all(model(users, books) == 10.0)  # clipped to the rating scale in eval mode
    model.train()
    assert torch.all(model(users, books) > 10.0)  # ...but not while training (keeps gradients)


def test_score_matrix_equals_pairwise_forward():
    model = _model()
    users, books = _inputs(5)
    matrix = model.score_matrix(model.project_users(users), model.project_books(books[:3]))
    pairs = model(users.repeat_interleave(3, 0), books[:3].repeat(5, 1)).view(5, 3)
    torch.testing.assert_close(matrix, pairs)


def test_loss_decreases_on_a_tiny_set():
    torch.manual_seed(0)
    users, books = _inputs(256)
    target = (6 + 2 * torch.tanh(users[:, 0] * books[:, 0]) + users[:, 1]).clamp(1, 10)
    model = RatingMLP(12, 7, [32, 16], global_mean=float(target.mean())).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(model(users, books), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_structured_pruning_shrinks_layers_and_keeps_the_surviving_units():
    model = _model()
    pruned = prune_structured(model, 0.25)
    assert pruned.shapes() == {"user_in": [12, 12], "book_in": [12, 7], "tail.0": [6, 12], "tail.1": [1, 6]}
    # the surviving first-layer units are the largest-norm rows of the original, unchanged
    norms = model.user_in.weight.norm(dim=1)
    kept = torch.sort(torch.topk(norms, 12).indices).values
    torch.testing.assert_close(pruned.user_in.weight, model.user_in.weight[kept])
    torch.testing.assert_close(pruned.book_in.weight, model.book_in.weight[kept])
    assert not any(name.endswith("_orig") or name.endswith("_mask") for name, _ in pruned.named_buffers())
    users, books = _inputs()
    assert pruned(users, books).shape == (32,)


def test_int8_weights_stay_close_to_fp32():
    model = _model()
    quantized = quantize_int8(model)
    assert isinstance(quantized.user_in, Int8Linear) and quantized.user_in.weight_q.dtype == torch.int8
    users, books = _inputs()
    diff = (quantized(users, books) - model(users, books)).abs().max()
    assert 0 < diff < 0.05


@pytest.mark.parametrize("quantized", [False, True])
def test_scripted_model_agrees_with_eager(tmp_path, quantized):
    model = quantize_int8(_model()) if quantized else _model()
    scripted = script_model(model, tmp_path / "m.pt")
    users, books = _inputs()
    torch.testing.assert_close(scripted(users, books), model(users, books), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        scripted.score_matrix(scripted.project_users(users), scripted.project_books(books)),
        model.score_matrix(model.project_users(users), model.project_books(books)),
    )


def test_scripted_file_loads_without_the_project(tmp_path):
    script_model(quantize_int8(_model()), tmp_path / "m.pt")
    code = (
        "import sys, torch; m = torch.jit.load(sys.argv[1]); "
        "print(float(m(torch.zeros(2, 12), torch.zeros(2, 7))[0])); "
        "assert not any(n == 'model' or n.startswith('model.') for n in sys.modules)"
    )
    # -I: isolated mode, the project's folder is not on sys.path
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, str(tmp_path / "m.pt")], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert 1.0 <= float(out.stdout.strip()) <= 10.0


@pytest.mark.parametrize("transform", ["none", "pruned", "int8"])
def test_checkpoint_round_trip(tmp_path, transform):
    model = _model()
    if transform == "pruned":
        model = prune_structured(model, 0.5)
    elif transform == "int8":
        model = quantize_int8(prune_structured(model, 0.5))
    save_checkpoint(model, tmp_path / "m.pt")
    again = load_checkpoint(tmp_path / "m.pt")
    users, books = _inputs()
    torch.testing.assert_close(again(users, books), model(users, books))
    assert again.shapes() == model.shapes()
