"""Save and load RatingMLP files: eager checkpoints (architecture + weights) and the TorchScript export."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from model.network import Int8Linear, RatingMLP, quantize_int8


def save_checkpoint(model: RatingMLP, path: Path) -> None:
    """Write weights plus the layer widths needed to rebuild the (possibly pruned) network."""
    shapes = model.shapes()
    arch = {
        "user_dim": shapes["user_in"][1],
        "book_dim": shapes["book_in"][1],
        "hidden": [shapes["user_in"][0], *[shape[0] for key, shape in shapes.items() if key.startswith("tail.")][:-1]],
        "quantized": isinstance(model.user_in, Int8Linear),
    }
    torch.save({"arch": arch, "state_dict": model.state_dict()}, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> RatingMLP:
    """Rebuild a RatingMLP from ``save_checkpoint`` output, in eval mode."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    arch = blob["arch"]
    model = RatingMLP(arch["user_dim"], arch["book_dim"], arch["hidden"])
    if arch["quantized"]:
        model = quantize_int8(model)
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def load_scripted(path: Path, map_location: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript export in eval mode, through ``torch.jit.load`` alone; TorchScript's
    deprecation warnings say nothing actionable to users, so they stay out of their output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location=map_location).eval()
