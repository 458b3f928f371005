"""End-to-end fine-tuning of the text encoder together with the MLP.

Each step re-embeds the texts of the batch's users and books with gradients, so the rating loss
reaches BERT-tiny. The other feature parts (taste profile, history stats) stay as computed from
the starting embeddings; after this stage the caller re-embeds the catalog with the tuned encoder
and refits the MLP on those features, so serving and batch see exactly what training saw.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from model.catalog import Catalog
from model.encoder import TextEncoder
from model.network import RatingMLP
from model.text import book_texts as book_texts_of
from model.text import user_texts as user_texts_of
from train.config import TrainConfig
from train.rating.dataset import TrainingData
from train.rating.fit import make_optimizer

log = logging.getLogger("bookrec.finetune")


def _with_text(
    encoder: TextEncoder, table: torch.Tensor, rows: torch.Tensor, n_entities: int, texts: list[str], dim: int
) -> torch.Tensor:
    """Feature rows whose text-embedding part is recomputed by the (trainable) encoder."""
    entity = rows % n_entities
    unique, inverse = torch.unique(entity, return_inverse=True)
    emb = encoder.encode([texts[i] for i in unique.tolist()])[inverse]
    return torch.cat([emb, table[rows, dim:].to(emb.device)], dim=1)


def fine_tune(
    encoder: TextEncoder,
    model: RatingMLP,
    catalog: Catalog,
    data: TrainingData,
    cfg: TrainConfig,
    progress: bool = True,
) -> dict:
    """Train encoder and MLP jointly for ``cfg.fine_tune_steps`` mini-batches; returns a summary."""
    torch.manual_seed(cfg.seed)
    book_texts, user_texts = book_texts_of(catalog.books), user_texts_of(catalog.users)
    dim = catalog.spec.emb_dim
    n_users, n_books = len(catalog.users), len(catalog.books)
    train = data.splits["train"]
    # train.optimizer and train.lr as for the MLP alone; the encoder's parameters learn at encoder_lr.
    optimizer = make_optimizer(
        [{"params": model.parameters()}, {"params": encoder.model.parameters(), "lr": cfg.encoder_lr}], cfg
    )
    encoder.model.train()
    model.train()
    generator = torch.Generator().manual_seed(cfg.seed)
    start, losses = time.perf_counter(), []
    for _ in tqdm(range(cfg.fine_tune_steps), desc="fine-tune encoder", disable=not progress):
        idx = torch.randint(len(train), (cfg.fine_tune_batch_size,), generator=generator)
        users = _with_text(encoder, data.user_table, train.user_row[idx], n_users, user_texts, dim)
        books = _with_text(encoder, data.book_table, train.book_row[idx], n_books, book_texts, dim)
        loss = nn.functional.mse_loss(model(users, books), train.rating[idx].to(users.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    encoder.model.eval()
    model.eval()
    seconds = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10) :]
    summary = {
        "optimizer": type(optimizer).__name__,
        "steps": cfg.fine_tune_steps,
        "batch_size": cfg.fine_tune_batch_size,
        "seconds": round(seconds, 1),
        "first_loss": losses[0] if losses else None,
        "last_loss": sum(tail) / len(tail) if tail else None,
    }
    log.info("encoder fine-tuned: %s", summary)
    return summary
