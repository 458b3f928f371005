"""A new model version from a served one and an update folder, without retraining.

The networks are the source's (rating MLP, towers, ranker); what changes is the catalog they score:

- new books (appended at the end, so every trained row keeps its place) and changed books (new
  metadata, same row) are embedded with the version's own encoder in the form the worker embeds
  with (``load_serving_encoder``: the scripted trace, no transformers import), through the
  embedding cache;
- new users join the catalog, changed users get their new text embedded;
- new ratings join their readers' histories (``catalog/history.parquet``; a pair already there takes
  the new rating, an implicit 0 never replaces an explicit one), so the history features, the
  books' rating statistics and the rating MLP's book projections (computed from the catalog at
  load) follow;
- the towers' id, history-bag, author and publisher tables grow to the new catalog with the rows a
  book nobody read in training has (zero, no id), author and publisher rows moved to the codes the
  new catalog gives them; every book vector is re-embedded by the towers (``book_vectors.npy``);
- the book index (``model/book_index.py``), where the source has one, takes the new books: when
  every old book's vector is bit-for-bit the source's (new books alone: no ratings, no changed
  book, no author code moved) the new vectors are added to the source's graph, in time that grows
  with the new books and not the catalog; otherwise it is rebuilt with the source's settings, as
  a graph over stale vectors would propose the wrong candidates. A source without one gets one
  when the new catalog reaches the config's threshold;
- the item graph is rebuilt from the new history when ratings arrived (seconds at the shared
  catalog), else padded to the new catalog; the author source is computed from the catalog at load;
- withdrawn books are listed in ``catalog/withdrawn.json``: the recommender never offers them (the
  towers' retrieval, the graph and the author sources), and later versions keep the list.

The version is written into a staging folder beside ``out``, its manifest written and verified,
and only then renamed to ``out``: the source is never modified, and a failed update leaves nothing.
``update.json`` records what it was built from (the source's manifest hash, every input's SHA-256,
the counts and the rows skipped).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import yaml

from model import layout
from model.artifacts import ModelFolder
from model.book_index import BookIndex, IndexSettings
from model.candidates import ItemGraph
from model.catalog import Catalog, save_array, write_catalog
from model.checkpoint import load_scripted
from model.encoder import load_serving_encoder
from model.manifest import file_sha256
from model.recommend import embed_book_set
from model.text import book_texts, user_texts
from train.config import Config
from train.data.ingest import DataError
from train.features.embed import EmbeddingCache
from train.ranking.graph import rp3beta_graph
from train.ranking.step import training_history
from train.retrieval.towers import TwoTower
from train.update.inputs import UpdateInputs, read_update

log = logging.getLogger("bookrec.update")

# Run-folder files a version carries over (the archive reads the config and the code record).
CARRIED = (layout.CONFIG_FILE, layout.VERSIONS_FILE)


class UpdateError(RuntimeError):
    """The update cannot be made (the message says why); nothing was written."""


@dataclass
class Source:
    """The model folder an update starts from: a run folder, or a ``.mar`` unpacked to a temporary folder."""

    folder: ModelFolder
    shown: str
    config: Config
    version: str
    record: dict[str, Any]  # the source's own update record (empty for a trained run)


def open_source(path: Path, scratch: Path) -> Source:
    """The verified model folder of ``path`` (a run folder, a version folder or a ``.mar``)."""
    path = Path(path)
    if path.is_file():
        try:
            with zipfile.ZipFile(path) as zf:
                zf.extractall(scratch)
        except (zipfile.BadZipFile, OSError) as err:
            raise UpdateError(f"{path}: not a readable .mar: {err}") from None
        folder = ModelFolder(scratch)
    elif path.is_dir():
        folder = ModelFolder(path)
    else:
        raise UpdateError(f"{path}: no such run folder or .mar")
    folder.verify(serving=True, shown=str(path))
    meta = folder.metadata()
    if (folder / layout.CONFIG_FILE).is_file():
        config = yaml.safe_load((folder / layout.CONFIG_FILE).read_text())
    elif "config" in meta:
        config = meta["config"]
    else:
        raise UpdateError(f"{path}: neither {layout.CONFIG_FILE} nor a config in {layout.METADATA_FILE}")
    record = folder.read_json(layout.UPDATE_RECORD) or meta.get("update") or {}
    version = str(record.get("version") or meta.get("version") or "1.0")
    return Source(folder, str(path), Config.model_validate(config), version, record)


def next_version(version: str) -> str:
    """ "1.0" -> "2.0"; a version that is not a number gets ".1" appended."""
    try:
        return f"{int(float(version)) + 1}.0"
    except ValueError:
        return f"{version}.1"


def build_version(
    source_path: Path,
    update_dir: Path,
    out: Path,
    *,
    version: str | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Write the new version folder ``out`` (must not exist); returns its update record."""
    out = Path(out).resolve()
    if out.exists():
        raise UpdateError(f"{out}: exists; a version is written once, into a new folder")
    if Path(source_path).resolve() == out:
        raise UpdateError("the new version must not be written over its source")
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bookrec-update-src-") as scratch:
        src = open_source(Path(source_path), Path(scratch))
        staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-building-"))
        try:
            record = _build(src, Path(update_dir), staged, version or next_version(src.version), cache_dir, start)
            ModelFolder(staged).write_manifest()
            ModelFolder(staged).verify(serving=True, shown=f"{out} (new version)")
            record["seconds"]["total"] = round(time.perf_counter() - start, 2)
            record["bytes"] = sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())
            (staged / layout.UPDATE_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
            staged.rename(out)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    log.info("version %s written to %s in %.1f s", record["version"], out, record["seconds"]["total"])
    return record


def _build(src: Source, update_dir: Path, dest: Path, version: str, cache_dir: Path | None, start: float) -> dict:
    old = src.folder.load_catalog()
    inputs = read_update(update_dir, set(old.book_index), set(old.user_index))
    if not (len(inputs.books) or len(inputs.users) or len(inputs.ratings) or inputs.withdrawn):
        raise DataError(f"{update_dir}: no usable row: {inputs.bad_rows} bad rows ({'; '.join(inputs.rejected[:5])})")
    read = time.perf_counter()
    _copy_model(src.folder.path, dest)
    for name in CARRIED:
        if (src.folder / name).is_file():
            shutil.copy2(src.folder / name, dest / name)
    if not (dest / layout.CONFIG_FILE).is_file():
        (dest / layout.CONFIG_FILE).write_text(yaml.safe_dump(src.config.model_dump(mode="json"), sort_keys=False))
    if not (dest / layout.VERSIONS_FILE).is_file():
        code = (src.folder.metadata().get("code") or {}).get("trained_with")
        (dest / layout.VERSIONS_FILE).write_text(json.dumps({"code": code}, indent=2) + "\n")

    cache = Path(cache_dir or src.config.encoder.cache_dir)
    catalog, counts, embedded = _write_catalog(src, old, inputs, dest, cache)
    embedded_at = time.perf_counter()
    towers = _grow_towers(src.folder, old, catalog, dest)
    vectors = embed_book_set(towers, catalog, catalog.book_feats, torch.arange(len(catalog.books)))
    save_array(dest / layout.BOOK_VECTORS, vectors.numpy())
    towers_at = time.perf_counter()
    index = _book_index(src, vectors, dest)
    index_at = time.perf_counter()
    graph = _item_graph(src, catalog, dest, rebuild=len(inputs.ratings) > 0)
    graph_at = time.perf_counter()
    return {
        "version": version,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {
            "path": src.shown,
            "version": src.version,
            "manifest_sha256": file_sha256(src.folder / layout.MANIFEST_FILE),
            "update": src.record or None,
        },
        "inputs": {name: {"file": str(p), "sha256": file_sha256(p)} for name, p in inputs.files.items()},
        "counts": counts,
        "bad_rows": inputs.bad_rows,
        "rejected": inputs.rejected,
        "ingest": inputs.report.to_dict(),
        "embedded_texts": embedded,
        "item_graph": graph,
        "book_index": index,
        "seconds": {
            "read": round(read - start, 2),
            "catalog": round(embedded_at - read, 2),
            "towers": round(towers_at - embedded_at, 2),
            "index": round(index_at - towers_at, 2),
            "graph": round(graph_at - index_at, 2),
        },
    }


def _copy_model(src: Path, dest: Path) -> None:
    """The files the update does not change: rating models, encoder, settings, ranker."""
    for name in (*layout.MODEL_FILES.values(), layout.RETRIEVAL_SETTINGS, layout.RANKER_FILE, layout.RANKING_SETTINGS):
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    shutil.copytree(src / layout.ENCODER_DIR, dest / layout.ENCODER_DIR)


def _write_catalog(
    src: Source, old: Catalog, inputs: UpdateInputs, dest: Path, cache: Path
) -> tuple[Catalog, dict[str, int], dict[str, Any]]:
    """The new catalog tables in ``dest``: old rows in place (changed ones re-embedded), new ones last."""
    # Copies: changed rows are re-embedded in place, and ``old`` stays the source's catalog.
    books, book_emb = old.books.copy(), old.book_emb.numpy().copy()
    users, user_emb = old.users.copy(), old.user_emb.numpy().copy()
    encoder = load_serving_encoder(src.folder / layout.ENCODER_DIR)
    embed = EmbeddingCache(cache)
    batch = src.config.encoder.batch_size

    books, book_emb, new_books, changed_books, book_stats = _merge(
        books,
        book_emb,
        inputs.books,
        "isbn",
        old.book_index,
        lambda f: embed.embed(encoder, book_texts(f), batch, False),
    )
    users, user_emb, new_users, changed_users, user_stats = _merge(
        users,
        user_emb,
        inputs.users,
        "user_id",
        old.user_index,
        lambda f: embed.embed(encoder, user_texts(f), batch, False),
    )
    history, added, replaced = _join_history(old.history, inputs.ratings)
    catalog = write_catalog(dest, books, book_emb, users, user_emb, history, old.spec)
    withdrawn = sorted(set(old.books["isbn"].iloc[old.withdrawn]) | set(inputs.withdrawn))
    if withdrawn:
        (dest / layout.catalog_path(layout.WITHDRAWN_FILE)).write_text(json.dumps(withdrawn, indent=1) + "\n")
    catalog.withdrawn = catalog.book_rows(withdrawn).numpy().astype(np.int64)
    counts = {
        "books": len(books),
        "new_books": new_books,
        "changed_books": changed_books,
        "users": len(users),
        "new_users": new_users,
        "changed_users": changed_users,
        "new_ratings": added,
        "replaced_ratings": replaced,
        "history": len(history),
        "withdrawn": len(withdrawn),
        "newly_withdrawn": len(set(inputs.withdrawn) - set(old.books["isbn"].iloc[old.withdrawn])),
    }
    return catalog, counts, {"books": book_stats, "users": user_stats}


def _merge(
    table: pd.DataFrame, emb: np.ndarray, update: pd.DataFrame, key: str, index: dict, embed
) -> tuple[pd.DataFrame, np.ndarray, int, int, dict]:
    """``table`` with the rows of ``update`` applied: known keys replaced in place, new ones appended;
    only the update's rows are embedded."""
    if not len(update):
        return table, emb, 0, 0, {"texts": 0}
    update = update[table.columns.tolist()].reset_index(drop=True)
    vectors, stats = embed(update)
    rows = update[key].map(index)
    known = rows.notna().to_numpy()
    table, emb = table.copy(), emb.copy()
    if known.any():
        at = rows[known].astype(np.int64).to_numpy()
        for column in table.columns:
            table.loc[at, column] = update.loc[known, column].to_numpy()
        emb[at] = vectors[known]
    fresh = update[~known]
    table = pd.concat([table, fresh], ignore_index=True).astype(table.dtypes.to_dict())
    emb = np.concatenate([emb, vectors[~known]])
    return table, emb, int((~known).sum()), int(known.sum()), stats


def _join_history(history: pd.DataFrame, ratings: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """The history with ``ratings`` joined: a new pair appended; a pair already there takes the new
    rating, except that an implicit 0 never replaces an explicit rating."""
    if not len(ratings):
        return history, 0, 0
    ratings = ratings[history.columns.tolist()].astype(history.dtypes.to_dict())
    keys = pd.MultiIndex.from_frame(history[["user_id", "isbn"]])
    at = keys.get_indexer(pd.MultiIndex.from_frame(ratings[["user_id", "isbn"]]))
    known = at >= 0
    history = history.copy()
    replace = known & ~((ratings["rating"].to_numpy() == 0) & (history["rating"].to_numpy()[np.maximum(at, 0)] > 0))
    history.loc[history.index[at[replace]], "rating"] = ratings["rating"].to_numpy()[replace]
    out = pd.concat([history, ratings[~known]], ignore_index=True)
    return out, int((~known).sum()), int(replace.sum())


def _grow_towers(folder: ModelFolder, old: Catalog, new: Catalog, dest: Path) -> torch.jit.ScriptModule:
    """The source's towers with tables as long as the new catalog: a new book's id and history-bag
    rows are zero and it has no id (as a book nobody read in training); author and publisher rows
    follow their names to the codes the new catalog gives them (a new name: zero, as unknown)."""
    scripted = load_scripted(folder / layout.RETRIEVAL_FILE)
    state = {k: v.clone() for k, v in scripted.state_dict().items()}
    hidden, user_dim = state["user_mlp.0.weight"].shape
    book_dim = state["book_mlp.0.weight"].shape[1]
    dim = state["user_mlp.2.weight"].shape[0]
    n_old, n_new = len(old.books), len(new.books)
    for name in ("book_id.weight", "context.weight"):
        state[name] = torch.cat([state[name], torch.zeros(n_new - n_old, dim)])
    state["id_known"] = torch.cat([state["id_known"], torch.zeros(n_new - n_old, dtype=torch.bool)])
    for group in ("author", "publisher"):
        old_vocab, new_vocab = old.groups[group][1], new.groups[group][1]
        table = torch.zeros(len(new_vocab) + 1, dim)
        for key, code in new_vocab.items():
            if key in old_vocab:
                table[code + 1] = state[f"{group}.weight"][old_vocab[key] + 1]
        state[f"{group}.weight"] = table
    model = TwoTower(
        user_dim, book_dim, n_new, len(new.groups["author"][1]), len(new.groups["publisher"][1]), dim, hidden
    )
    model.load_state_dict(state)
    model.eval()
    torch.jit.script(model).save(str(dest / layout.RETRIEVAL_FILE))
    return load_scripted(dest / layout.RETRIEVAL_FILE)


def _book_index(src: Source, vectors: torch.Tensor, dest: Path) -> dict[str, Any] | None:
    """The book index over the new vectors (None: the version searches exhaustively): the source's
    with the new books added where no old vector changed, else built anew."""
    if src.folder.has_index():
        settings = IndexSettings.load(src.folder / layout.BOOK_INDEX_SETTINGS)
    elif len(vectors) >= src.config.retrieval.index.threshold:
        settings = src.config.retrieval.index.settings()
    else:
        return None
    start = time.perf_counter()
    grown = _grown_index(src.folder, vectors)
    added = grown is not None
    index = grown if grown is not None else BookIndex.build(vectors.numpy(), settings)
    index.save(dest / layout.BOOK_INDEX, dest / layout.BOOK_INDEX_SETTINGS)
    seconds = time.perf_counter() - start
    how = "grew by the new books" if added else "rebuilt"
    log.info("update: %s index of %d books %s in %.2f s", settings.kind, len(vectors), how, seconds)
    return {
        "kind": settings.kind,
        "books": len(vectors),
        "rebuilt_from_source": src.folder.has_index() and not added,
        "added_to_source": added,
    }


def _grown_index(folder: ModelFolder, vectors: torch.Tensor) -> BookIndex | None:
    """The source's index with the rows past its end added, or None when it has none or any old
    book's vector differs from the one it was built over."""
    if not folder.has_index():
        return None
    old = folder.book_vectors()
    if len(old) > len(vectors) or not torch.equal(old, vectors[: len(old)].to(old.dtype)):
        return None
    index = folder.book_index(mapped=False)
    assert index is not None and index.n_books == len(old)
    index.add(vectors[len(old) :].numpy())
    return index


def _item_graph(src: Source, catalog: Catalog, dest: Path, rebuild: bool) -> dict[str, Any] | None:
    """The ranking stage's item graph over the new catalog (None without a ranking stage)."""
    if not src.folder.has_ranking():
        return None
    n = len(catalog.books)
    if rebuild:
        rc = src.config.ranking
        graph = rp3beta_graph(training_history(catalog), rc.graph_alpha, rc.graph_beta, rc.graph_neighbours)
    else:
        w = src.folder.item_graph().weights.tocsr()
        w = sp.csr_matrix(
            (w.data, w.indices, np.concatenate([w.indptr, np.full(n - w.shape[0], w.indptr[-1])])), shape=(n, n)
        )
        graph = ItemGraph(w)
    graph.save(dest / layout.ITEM_GRAPH)
    return {"rebuilt": rebuild, "books": n, "edges": int(graph.weights.nnz)}
