"""The encoder's serving form: a TorchScript trace of the BertModel and its pooling, next to the
``tokenizer.json`` transformers already writes, so a worker embeds without importing transformers
(``model.encoder.ScriptedTextEncoder``).

A trace records one run of the Python code, so ``save_scripted`` checks what it wrote before it
keeps it: the worker's loader, on probe texts of every length (empty, truncated, accented) and in
batches of one and of many, must give the transformers tokenizer's token ids and embeddings within
``TOLERANCE``.

``python -m train export-encoder RUN`` writes the serving form into a run folder saved before it
existed (and its manifest, when the folder had one and still matched it).
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from model import layout
from model.artifacts import ModelFolder
from model.encoder import ScriptedTextEncoder, TextEncoder, load_saved_encoder, pool

TOLERANCE = 1e-5
# Lengths from nothing ([CLS] [SEP]) to far past any max_length, in mixed case with accents and
# non-Latin script, so the example batch pads and the checks cover truncation.
PROBE_TEXTS = [
    "",
    "a",
    "The Dragon Queen by Ann Smith, 1999, Tor",
    "reader from paris, ile de france, france, age 34",
    "Crème Brûlée à Zürich: naïve CAFÉ — 東京 ☃",
    "Murder at Midnight by Bob Jones, 2001, Penguin. " * 30,
    "x" * 600,
    "  \t  ",
]


class ScriptedEncoderMismatch(RuntimeError):
    """The serving form does not reproduce the encoder it was made from."""


class _Pooled(torch.nn.Module):
    """BertModel + the encoder's pooling, as one traceable (input_ids, attention_mask) -> [N, H]."""

    def __init__(self, bert: torch.nn.Module, pooling: str):
        super().__init__()
        self.bert = bert
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)


def save_scripted(encoder: TextEncoder, folder: Path) -> Path:
    """Write ``encoder``'s trace into its saved ``folder`` (``TextEncoder.save`` wrote the rest),
    record what loading it needs in ``encoder.json``, and check the result; returns the trace's path."""
    folder = Path(folder)
    model = _Pooled(copy.deepcopy(encoder.model).cpu().eval(), encoder.pooling).eval()
    # The example must pad: a trace of an all-ones mask could drop the mask from the graph.
    example = encoder.tokenizer(
        PROBE_TEXTS, padding=True, truncation=True, max_length=encoder.max_length, return_tensors="pt"
    )
    path = folder / layout.ENCODER_SCRIPTED
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings name the shape checks frozen into the graph; check_scripted below tests the result.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example["input_ids"], example["attention_mask"]), check_trace=False)
        traced.save(str(path))
    meta = folder / layout.ENCODER_META
    info = json.loads(meta.read_text())
    info.update(dim=encoder.dim, pad_token=encoder.tokenizer.pad_token)
    meta.write_text(json.dumps(info, indent=2))
    try:
        check_scripted(encoder, ScriptedTextEncoder.load(folder))
    except ScriptedEncoderMismatch:
        path.unlink()  # without it the folder serves through transformers, as before
        raise
    return path


def check_scripted(encoder: TextEncoder, scripted: ScriptedTextEncoder) -> None:
    """Raise ``ScriptedEncoderMismatch`` unless ``scripted`` tokenizes and embeds as ``encoder``."""
    texts = PROBE_TEXTS
    ours = [e.ids for e in scripted.tokenizer.encode_batch(texts)]
    theirs = encoder.tokenizer(texts, padding=True, truncation=True, max_length=encoder.max_length)["input_ids"]
    if ours != theirs:
        raise ScriptedEncoderMismatch("the tokenizers tokenizer gives other token ids than the encoder's")
    reference = encoder.embed(texts)
    for batch_size in (1, 3, len(texts)):
        diff = float(np.abs(scripted.embed(texts, batch_size=batch_size) - reference).max())
        if not diff < TOLERANCE:
            raise ScriptedEncoderMismatch(
                f"the traced encoder's embeddings differ from the encoder's by {diff:.2e} (batches of {batch_size})"
            )


def export_run(run_dir: Path) -> list[str]:
    """Add the serving form to the encoder of an existing run folder; the manifest, where the folder
    has one, is verified first and rewritten after (a folder that no longer matches it is refused)."""
    folder = ModelFolder(Path(run_dir))
    has_manifest = (folder / layout.MANIFEST_FILE).is_file()
    if has_manifest:
        folder.verify(serving=True)
    encoder_dir = folder / layout.ENCODER_DIR
    done = [str(save_scripted(load_saved_encoder(encoder_dir), encoder_dir))]
    if has_manifest:
        done.append(str(folder.write_manifest()))
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train export-encoder",
        description="Write the encoder's TorchScript serving form into a run folder saved before it existed.",
    )
    parser.add_argument("run_dir", type=Path, help="training run folder")
    args = parser.parse_args(argv)
    for path in export_run(args.run_dir):
        print(f"wrote {path}")
    if not (args.run_dir / layout.MANIFEST_FILE).is_file():
        print(f"no {layout.MANIFEST_FILE}: for a folder you trust, `python -m serving.archive --write-manifest RUN`")
    return 0
