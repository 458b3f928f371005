"""The model folder's manifest (``manifest.json``): every file the model needs, with its size and
SHA-256, and the stages the model has.

Training writes it once the model files are final, the archive ships it, and
``ModelFolder.verify`` checks a folder against it before the handler or the batch job loads one: a
file that is missing, truncated or replaced is refused by name instead of failing later inside
TorchScript or Parquet, and a model made with a ranking stage never loads without one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from model import layout

FORMAT = 1


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, as hex."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def needed_files(root: Path) -> list[str]:
    """The model files of the folder ``root``, relative to it: every rating-model variant it holds,
    the scoring files, every file of the encoder folder, and the ranking stage and the book index
    where it has them."""
    root = Path(root)
    variants = [name for name in layout.MODEL_FILES.values() if (root / name).is_file()]
    encoder = root / layout.ENCODER_DIR
    encoder_files = sorted(str(p.relative_to(root)) for p in encoder.rglob("*") if p.is_file())
    ranking = [name for name in layout.RANKING_FILES if (root / name).is_file()]
    withdrawn = layout.catalog_path(layout.WITHDRAWN_FILE)
    optional = [name for name in (withdrawn, *layout.catalog_feature_paths()) if (root / name).is_file()]
    index = [name for name in layout.INDEX_FILES if (root / name).is_file()]
    return [*variants, *layout.SCORING_FILES, *encoder_files, *ranking, *index, *optional]


def build(root: Path, files: list[str] | None = None) -> dict[str, Any]:
    """The manifest of ``files`` of ``root`` (default: ``needed_files``); the ranking stage is on
    when all of its files are listed, the index stage names the index's kind when its files are."""
    root = Path(root)
    files = needed_files(root) if files is None else files
    encoder = json.loads((root / layout.encoder_path(layout.ENCODER_META)).read_text())
    return {
        "format": FORMAT,
        "stages": {
            "ranking": all(name in files for name in layout.RANKING_FILES),
            "encoder": encoder.get("source"),
            "index": index_kind(root) if all(name in files for name in layout.INDEX_FILES) else None,
        },
        "files": {name: {"bytes": (root / name).stat().st_size, "sha256": file_sha256(root / name)} for name in files},
    }


def index_kind(root: Path) -> str:
    """The kind of the folder's book index, from its settings file (read as JSON: no faiss needed)."""
    return str(json.loads((Path(root) / layout.BOOK_INDEX_SETTINGS).read_text())["kind"])


def write(root: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` into ``root`` (through a temporary file, so a reader never sees half of it)."""
    path = Path(root) / layout.MANIFEST_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return path
