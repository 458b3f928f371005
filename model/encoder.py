"""The text encoder a model folder holds: reload it (``load_saved_encoder``) and embed texts.

Building one by name (hub id, local folder, packaged weights or a random init) is training's job:
``train/features/encoders.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from model import layout


@dataclass
class TextEncoder:
    """A tokenizer + BertModel pair with a pooling rule; ``source`` says what the weights are."""

    tokenizer: object
    model: torch.nn.Module
    pooling: str
    max_length: int
    source: str  # "pretrained:<id or folder>" or "random-init:seed=<n>,vocab=<where>"

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        """Hash of everything that changes an embedding: weights, vocab, pooling, length."""
        h = hashlib.sha256()
        h.update(f"{self.pooling}|{self.max_length}|".encode())
        h.update(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled embeddings of one batch of texts, with autograd (used for fine-tuning)."""
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Embeddings of ``texts`` as float32 [N, dim]; batches are length-sorted for speed."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        was_training = self.model.training
        self.model.eval()
        order = np.argsort([len(t) for t in texts], kind="stable")
        bar = tqdm(total=len(texts), desc="embed", unit="text", disable=not progress)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self.encode([texts[i] for i in idx]).float().cpu().numpy()
            bar.update(len(idx))
        bar.close()
        self.model.train(was_training)
        return out

    def save(self, folder: Path) -> None:
        """Write weights, config and tokenizer so ``load_saved_encoder`` can reload them offline."""
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        info = {
            "pooling": self.pooling,
            "max_length": self.max_length,
            "source": self.source,
        }
        (folder / layout.ENCODER_META).write_text(json.dumps(info, indent=2))


def quiet_transformers() -> None:
    """transformers draws its own progress bars for loading/saving a 4 MB model: noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_saved_encoder(folder: Path) -> TextEncoder:
    """Reload an encoder written by ``TextEncoder.save`` (no network)."""
    from transformers import AutoTokenizer, BertModel

    quiet_transformers()
    info = json.loads((folder / layout.ENCODER_META).read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = BertModel.from_pretrained(str(folder), add_pooling_layer=False)
    model.eval()
    return TextEncoder(tokenizer, model, info["pooling"], int(info["max_length"]), info["source"])
