"""A bounded, rotating sample of request features for the drift check (``python -m serving.drift``).

One JSON line per sampled answered request, holding only what the drift check compares: the
action, whether the user is known, the user's age and country (a known user's from the catalog),
how many books were asked about and how many were new, the known books' ISBNs, the new books' texts
(title, author, year, publisher, as the model reads them) and the predicted ratings (rate) or
top-k scores (recommend). Never the raw body, and no user id or city unless ``BOOKREC_DRIFT_USER_IDS=1``
(ids only). Refused requests are not sampled (the error metrics count them).

Configured by environment (inherited by TorchServe's workers):

- ``BOOKREC_DRIFT_LOG``: the log file; in a TorchServe worker the default is
  ``$LOG_LOCATION/drift-sample.jsonl``, else ``$PWD/logs/drift-sample.jsonl`` (``logs/`` beside
  TorchServe's own logs, ``$PWD`` being where ``torchserve --start`` ran); ``off`` disables it.
- ``BOOKREC_DRIFT_RATE``: fraction of answered requests sampled (default 1.0).
- ``BOOKREC_DRIFT_MAX_MB`` (default 10) and ``BOOKREC_DRIFT_BACKUPS`` (default 3): rotation, so the
  sample never takes more than MAX_MB x (BACKUPS + 1) per worker.

Each worker writes its own file (``drift-sample.w<N>.jsonl``, N from its socket) so rotation never
races between processes; the drift check reads them all.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from model.text import book_text

log = logging.getLogger("bookrec.drift_sample")

FILE_STEM = "drift-sample"


def worker_tag() -> str:
    """``w<N>`` from a TorchServe worker's ``--sock-name`` (stable across restarts of that worker
    slot), else ``p<pid>``."""
    for arg in sys.argv:
        match = re.search(r"\.ts\.sock\.(\d+)$", arg)
        if match:
            return f"w{match.group(1)}"
    return f"p{os.getpid()}"


def in_torchserve_worker() -> bool:
    return worker_tag().startswith("w")


def default_path(env: dict[str, str] | None = None) -> Path | None:
    """Where the sample goes, from the environment (None: disabled). Without ``BOOKREC_DRIFT_LOG``
    only TorchServe workers sample (not the handler loaded in-process by tests or benchmarks)."""
    env = dict(os.environ if env is None else env)
    explicit = env.get("BOOKREC_DRIFT_LOG", "").strip()
    if explicit.lower() in ("off", "0", "false", "none"):
        return None
    if explicit:
        base = Path(explicit)
    elif not in_torchserve_worker():
        return None
    elif env.get("LOG_LOCATION"):
        base = Path(env["LOG_LOCATION"]) / f"{FILE_STEM}.jsonl"
    elif env.get("PWD"):
        base = Path(env["PWD"]) / "logs" / f"{FILE_STEM}.jsonl"
    else:
        return None
    return base.with_name(f"{base.stem}.{worker_tag()}{base.suffix or '.jsonl'}")


class DriftSampler:
    """Writes sampled request features of each batch to a size-rotated JSON-lines file."""

    def __init__(
        self,
        path: Path,
        catalog_users: Any,
        rate: float = 1.0,
        max_bytes: int = 10 << 20,
        backups: int = 3,
        user_ids: bool = False,
        seed: int | None = None,
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.rate = rate
        self.user_ids = user_ids
        self._random = random.Random(seed)
        self._users = catalog_users.set_index("user_id")[["age", "country"]]
        self._logger = logging.getLogger(f"bookrec.drift_sample.{path}")
        self._logger.propagate = False  # the sample is data, not TorchServe's model log
        self._logger.setLevel(logging.INFO)
        if not self._logger.handlers:
            handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._logger.addHandler(handler)

    @classmethod
    def from_env(cls, catalog_users: Any) -> DriftSampler | None:
        """The sampler the environment asks for (see the module doc), or None when disabled."""
        path = default_path()
        rate = float(os.environ.get("BOOKREC_DRIFT_RATE", "1"))
        if path is None or rate <= 0:
            return None
        return cls(
            path,
            catalog_users,
            rate=min(rate, 1.0),
            max_bytes=int(float(os.environ.get("BOOKREC_DRIFT_MAX_MB", "10")) * (1 << 20)),
            backups=int(os.environ.get("BOOKREC_DRIFT_BACKUPS", "3")),
            user_ids=os.environ.get("BOOKREC_DRIFT_USER_IDS", "") in ("1", "true", "yes"),
        )

    def record(self, bodies: list[Any], results: list[tuple[int, dict[str, Any]]]) -> int:
        """Sample the answered requests of one batch; returns how many lines were written."""
        written = 0
        for body, (status, payload) in zip(bodies, results, strict=True):
            if status != 200 or not isinstance(body, dict) or payload.get("action") == "similar":
                continue  # a similar-books request describes no reader
            if self.rate < 1.0 and self._random.random() >= self.rate:
                continue
            try:
                line = self.features(body, payload)
            except Exception:  # a sample must never break an answer
                log.exception("could not sample a request for the drift log")
                continue
            self._logger.info(json.dumps(line, separators=(",", ":")))
            written += 1
        return written

    def features(self, body: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        """The drift features of one answered request (see the module doc)."""
        user = body.get("user") or {}
        known = bool((payload.get("user") or {}).get("known"))
        if known:
            row = self._users.loc[int(user["user_id"])]
            age, country = row["age"], row["country"]
        else:
            age, country = user.get("age"), user.get("country")
        out: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "action": payload["action"],
            "user_known": known,
            "age": None if age is None or pd.isna(age) else int(age),
            "country": str(country).strip().lower() if isinstance(country, str) and country.strip() else None,
        }
        if self.user_ids and known:
            out["user_id"] = int(user["user_id"])
        if payload["action"] == "rate":
            isbns, texts = [], []
            for spec in body.get("books", []):
                if isinstance(spec, str):
                    isbns.append(spec)
                elif "isbn" in spec:
                    isbns.append(spec["isbn"])
                else:
                    fields = (spec.get(k) for k in ("title", "author", "year", "publisher"))
                    texts.append(book_text(*fields))
            out.update(
                books=len(isbns) + len(texts),
                new_books=len(texts),
                isbns=isbns,
                new_book_texts=texts,
                ratings=[round(p["rating"], 4) for p in payload["predictions"]],
            )
        else:
            out["scores"] = [round(r["score"], 4) for r in payload["recommendations"]]
        return out
