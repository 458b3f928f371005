"""Find the Book-Crossing CSVs: a given folder, ``$BOOKREC_DATA``, or a download.

Many machines that train the model have no internet, so a download failure is an
ordinary outcome: it raises :class:`DatasetUnavailable` with a message that says
what was tried and how to point the project at a local copy.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import shutil
import sys
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from train.cli import fail
from train.config import DEFAULT_URL, DataConfig
from train.data.ingest import DataError, detect_layout

LOG = logging.getLogger("bookrec.download")

ENV_VAR = "BOOKREC_DATA"
_CHUNK = 1 << 16


class DatasetUnavailable(RuntimeError):
    """The dataset could be neither found locally nor downloaded."""


def download_dataset(url: str, dest: Path, timeout: float = 30.0) -> Path:
    """Download the zip at ``url``, extract it into ``dest``; return the CSV folder."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / (Path(url.split("?", 1)[0]).name or "dataset.zip")
    partial = archive.with_name(archive.name + ".part")
    try:
        _fetch(url, partial, timeout)
        partial.replace(archive)
        _extract(archive, dest)
    except (
        OSError,
        http.client.HTTPException,
        ValueError,
        zipfile.BadZipFile,
    ) as error:
        partial.unlink(missing_ok=True)
        raise DatasetUnavailable(
            f"Could not download the Book-Crossing dataset from {url}: {error}. "
            f"Set {ENV_VAR} to a folder holding the dataset CSVs (BX-Books.csv, "
            "BX-Users.csv, BX-Book-Ratings.csv, or the Kaggle Books.csv, Users.csv, "
            "Ratings.csv) and run again."
        ) from error
    folder = _dataset_folder(dest)
    if folder is None:
        raise DatasetUnavailable(f"The archive from {url} holds no Book-Crossing CSVs")
    return folder


def resolve_data_dir(source: str | None, url: str | None, dest: Path) -> Path:
    """The folder with the dataset: ``source``, else ``$BOOKREC_DATA``, else download.

    An explicit ``source`` that does not hold the dataset is an error at once; a
    stale ``$BOOKREC_DATA`` falls through to the download. A previous download in
    ``dest`` is reused.
    """
    if source:
        return _validated(Path(source), "the given source folder")
    tried: list[str] = []
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return _validated(Path(env), f"${ENV_VAR}")
        except DatasetUnavailable as error:
            LOG.warning("Ignoring $%s=%s: no dataset there", ENV_VAR, env)
            tried.append(str(error))
    else:
        tried.append(f"${ENV_VAR} is not set")
    cached = _dataset_folder(Path(dest))
    if cached is not None:
        return cached
    url = url or DEFAULT_URL
    try:
        return download_dataset(url, Path(dest))
    except DatasetUnavailable as error:
        tried.append(str(error))
    raise DatasetUnavailable("No Book-Crossing dataset found. Tried:\n- " + "\n- ".join(tried))


def _validated(folder: Path, what: str) -> Path:
    try:
        detect_layout(folder)
    except FileNotFoundError as error:
        raise DatasetUnavailable(f"{what} ({folder}) is unusable: {error}") from error
    return folder


def _fetch(url: str, path: Path, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "bookrec"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with (
            open(path, "wb") as out,
            tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name) as bar,
        ):
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))


def _extract(archive: Path, dest: Path) -> None:
    root = dest.resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            target = (dest / member.filename).resolve()
            if not target.is_relative_to(root):  # refuse "../" members
                raise ValueError(f"unsafe path in archive: {member.filename}")
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


def _dataset_folder(root: Path) -> Path | None:
    """``root`` or the first folder below it that holds a dataset layout."""
    if not root.is_dir():
        return None
    for folder in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        try:
            detect_layout(folder)
        except FileNotFoundError:
            continue
        return folder
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Locate or download Book-Crossing.")
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--dest", type=Path, default=Path(DataConfig().download_dir))
    parser.add_argument("--source", help="use this folder instead of downloading")
    parser.add_argument("--verbose", action="store_true", help="a traceback with every error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        folder = resolve_data_dir(args.source, args.url, args.dest)
    except (DatasetUnavailable, DataError) as error:
        return fail(error, args.verbose)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
