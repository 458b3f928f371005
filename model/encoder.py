"""The text encoder a model folder holds: reload it and embed texts.

Two forms of one encoder: ``TextEncoder`` (transformers' tokenizer and BertModel: training builds,
fine-tunes and saves it, ``load_saved_encoder`` reloads it) and ``ScriptedTextEncoder`` (the
TorchScript trace of the same BertModel and pooling, and the ``tokenizers`` library's tokenizer
from the same ``tokenizer.json``), which the worker and the batch tools load through
``load_serving_encoder`` without importing transformers: that import alone took 7.5–9.5 s of a
worker's start on 2 cores.

Building one by name (hub id, local folder, packaged weights or a random init) and writing the
trace are training's job: ``train/features/encoders.py``, ``train/features/scripted.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from model import layout

log = logging.getLogger("bookrec.encoder")


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
        return pool(hidden, batch["attention_mask"], self.pooling)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Embeddings of ``texts`` as float32 [N, dim]; batches are length-sorted for speed."""
        was_training = self.model.training
        self.model.eval()
        try:
            return embed_in_batches(self.encode, texts, self.dim, batch_size, progress)
        finally:
            self.model.train(was_training)

    def save(self, folder: Path) -> None:
        """Write weights, config and tokenizer so ``load_saved_encoder`` can reload them offline."""
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        info = {
            "pooling": self.pooling,
            "max_length": self.max_length,
            "source": self.source,
            "dim": self.dim,
            "pad_token": self.tokenizer.pad_token,
        }
        (folder / layout.ENCODER_META).write_text(json.dumps(info, indent=2))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per text from the last hidden states [N, T, H]: [CLS]'s (``cls``) or the mean over real tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def embed_in_batches(
    encode: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    dim: int,
    batch_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """``encode`` over ``texts`` in length-sorted batches (less padding), as float32 [N, dim] in input order."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    if not texts:
        return out
    order = np.argsort([len(t) for t in texts], kind="stable")
    bar = tqdm(total=len(texts), desc="embed", unit="text", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        out[idx] = encode([texts[i] for i in idx]).float().cpu().numpy()
        bar.update(len(idx))
    bar.close()
    return out


@dataclass
class ScriptedTextEncoder:
    """The serving form of a saved ``TextEncoder``: the same tokens and the same pooled embeddings,
    through ``tokenizers`` and ``torch.jit.load`` alone (no transformers import).

    It runs on the CPU whatever the worker's device: the trace holds a CPU device constant from
    transformers' attention-mask code, and a request embeds a handful of short texts.
    """

    tokenizer: Any  # tokenizers.Tokenizer, truncating to max_length and padding to the batch's longest
    model: torch.jit.ScriptModule  # (input_ids, attention_mask) -> pooled [N, dim]
    dim: int
    pooling: str
    max_length: int
    source: str

    device = torch.device("cpu")

    @classmethod
    def load(cls, folder: Path) -> ScriptedTextEncoder:
        """Load the trace and tokenizer ``train/features/scripted.py`` wrote into ``folder``."""
        from tokenizers import Tokenizer

        info = json.loads((folder / layout.ENCODER_META).read_text())
        tokenizer = Tokenizer.from_file(str(folder / layout.ENCODER_TOKENIZER))
        # Set here, not taken from the file: transformers saves whatever its last call left there.
        tokenizer.enable_truncation(int(info["max_length"]))
        pad = info["pad_token"]
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad), pad_token=pad)
        with warnings.catch_warnings():  # TorchScript's deprecation notice: nothing to act on
            warnings.simplefilter("ignore")
            model = torch.jit.load(str(folder / layout.ENCODER_SCRIPTED), map_location="cpu").eval()
        return cls(tokenizer, model, int(info["dim"]), info["pooling"], int(info["max_length"]), info["source"])

    def fingerprint(self) -> str:
        """Hash of everything that changes an embedding (trace weights, tokenizer, pooling, length),
        marked as the scripted form: its vectors match ``TextEncoder``'s within float rounding, not
        bit for bit, so the two never share an embedding-cache key."""
        h = hashlib.sha256()
        h.update(f"scripted|{self.pooling}|{self.max_length}|".encode())
        h.update(self.tokenizer.to_str().encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled embeddings of one batch of texts."""
        batch = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in batch], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.long)
        return self.model(ids, mask)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Embeddings of ``texts`` as float32 [N, dim], as ``TextEncoder.embed`` gives them."""
        return embed_in_batches(self.encode, texts, self.dim, batch_size, progress)


def has_scripted(folder: Path) -> bool:
    """Whether the encoder folder holds the serving form (trace, tokenizer, and what loading them needs)."""
    if not ((folder / layout.ENCODER_SCRIPTED).is_file() and (folder / layout.ENCODER_TOKENIZER).is_file()):
        return False
    info = json.loads((folder / layout.ENCODER_META).read_text())
    return "dim" in info and "pad_token" in info


def load_serving_encoder(folder: Path, device: str | torch.device = "cpu") -> ScriptedTextEncoder | TextEncoder:
    """The encoder a worker embeds with: the scripted form, or, for a folder saved before it
    existed, the transformers form on ``device`` (imported only then, with a warning: the model
    still serves, it just starts slower; ``python -m train export-encoder RUN`` adds the scripted form)."""
    folder = Path(folder)
    if has_scripted(folder):
        return ScriptedTextEncoder.load(folder)
    log.warning(
        "%s has no %s: embedding through transformers (a slow worker start); "
        "`python -m train export-encoder RUN` writes it",
        folder,
        layout.ENCODER_SCRIPTED,
    )
    encoder = load_saved_encoder(folder)
    encoder.model.to(device)
    return encoder


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
