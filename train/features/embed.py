"""Text embeddings with a Parquet cache keyed by a hash of the text and the encoder."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.catalog import embedding_column, embedding_matrix, write_table
from model.encoder import ScriptedTextEncoder, TextEncoder

log = logging.getLogger("bookrec.embed")


def text_key(text: str, encoder_fingerprint: str) -> str:
    return hashlib.sha1(f"{encoder_fingerprint}\x00{text}".encode()).hexdigest()


class EmbeddingCache:
    """Append-only Parquet shards of (key, embedding); a rerun embeds only unseen texts."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._store: dict[str, np.ndarray] = {}
        for shard in sorted(self.folder.glob("*.parquet")):
            table = pq.read_table(shard)
            keys = table["key"].to_pylist()
            self._store.update(zip(keys, embedding_matrix(table["embedding"]), strict=False))

    def __len__(self) -> int:
        return len(self._store)

    def embed(
        self,
        encoder: TextEncoder | ScriptedTextEncoder,
        texts: list[str],
        batch_size: int = 256,
        progress: bool = True,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Embeddings of ``texts`` [N, dim] and stats: cache hits, texts embedded, texts/s."""
        fingerprint = encoder.fingerprint()
        keys = [text_key(t, fingerprint) for t in texts]
        missing: dict[str, str] = {}
        for key, text in zip(keys, texts, strict=False):
            if key not in self._store:
                missing.setdefault(key, text)
        stats = {"texts": len(texts), "unique_new": len(missing), "texts_per_s": 0.0}
        if missing:
            start = time.perf_counter()
            new = encoder.embed(list(missing.values()), batch_size=batch_size, progress=progress)
            stats["texts_per_s"] = len(missing) / max(time.perf_counter() - start, 1e-9)
            self._store.update(zip(missing.keys(), new, strict=False))
            self._write(list(missing.keys()), new)
            log.info(
                "embedded %d new texts at %.0f texts/s",
                len(missing),
                stats["texts_per_s"],
            )
        out = np.stack([self._store[k] for k in keys]) if keys else np.zeros((0, encoder.dim), np.float32)
        return out.astype(np.float32), stats

    def _write(self, keys: list[str], matrix: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        table = pa.table({"key": pa.array(keys, pa.string()), "embedding": embedding_column(matrix)})
        write_table(
            table,
            self.folder / f"part-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet",
        )
