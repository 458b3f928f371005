"""Drift check: does the served traffic still look like the data the model was trained and tested on?

    python -m serving.drift --run runs/bookcrossing --requests logs/ [--out DIR] [--psi 0.25]

``--requests`` is the handler's request sample (``handlers/drift_sample.py``): a JSON-lines file, or a
folder holding ``drift-sample*.jsonl*`` files (every worker's, rotated ones included).

The reference is the run's held-out ratings (val, test and the cold-start splits) as the evaluation
served them: a cold-start user arrives as a new user, a cold-start book as a new book. Compared,
each with the Population Stability Index over fixed bins (and a two-sample Kolmogorov-Smirnov
statistic for numeric ones, shown for information):

| feature | per | bins |
|---|---|---|
| user age | request / held-out rating | age bands, plus "unknown" |
| user country | request / held-out rating | the reference's 10 commonest countries, "other", "unknown" |
| new-user share | request / held-out rating | new, known |
| new-book share | book asked about / held-out rating | new, known |
| book text embedding | book asked about / held-out rating | reference deciles along its first 3 principal components |
| predicted rating | rate prediction / the model's prediction on val + test | 1..9 (bin k = [k, k+1)) |

New books' texts are re-embedded here with the run's saved encoder (the handler logs texts, not
vectors: serving pays nothing extra and the sample stays small and readable).

PSI below 0.1 is stable, 0.1-0.25 a moderate shift (reported), above ``--psi`` (0.25) drift. A
feature with fewer than ``--min-samples`` traffic values is not judged. Writes ``drift.md``,
``drift.json`` and ``drift.png`` into ``--out`` (default RUN/drift). Exit code 0: no drift;
1: drift in at least one feature (named on stderr and in the report); 2: bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy import stats

from model import layout
from model.artifacts import ModelFolder
from model.scoring import Scorer

log = logging.getLogger("bookrec.drift")

HELD_OUT = ("val", "test", "cold_user", "cold_book", "cold_both")
NEW_USER_SPLITS = ("cold_user", "cold_both")
NEW_BOOK_SPLITS = ("cold_book", "cold_both")
AGE_EDGES = (5, 18, 25, 35, 45, 55, 65, 75, 101)
TOP_COUNTRIES = 10
PCS = 3
EPS = 1e-4  # floor of a bin's share, so an empty bin does not make PSI infinite
WARN_PSI = 0.1


class DriftInputError(ValueError):
    """Bad ``--run`` or ``--requests``."""


@dataclass
class FeatureResult:
    name: str
    psi: float | None
    n_traffic: int
    n_reference: int
    bins: list[str]
    reference: list[float]
    traffic: list[float]
    ks: float | None = None
    verdict: str = "stable"  # stable | moderate | drift | too few samples
    note: str = ""


@dataclass
class DriftReport:
    run: str
    requests: list[str]
    n_requests: int
    period: tuple[str | None, str | None]
    psi_threshold: float
    features: list[FeatureResult] = field(default_factory=list)

    @property
    def drifted(self) -> list[str]:
        return [f.name for f in self.features if f.verdict == "drift"]


# ------------------------------------------------------------------------------------ statistics
def psi(reference: np.ndarray, traffic: np.ndarray) -> float:
    """Population Stability Index of two bin-share vectors: sum (t - r) * ln(t / r)."""
    r = np.maximum(np.asarray(reference, float), EPS)
    t = np.maximum(np.asarray(traffic, float), EPS)
    r, t = r / r.sum(), t / t.sum()
    return float(np.sum((t - r) * np.log(t / r)))


def shares(labels: pd.Series, bins: list[str]) -> np.ndarray:
    counts = labels.value_counts()
    total = max(len(labels), 1)
    return np.array([counts.get(b, 0) / total for b in bins], float)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float | None:
    """Two-sample Kolmogorov-Smirnov statistic (max distance of the empirical CDFs); None when a side is empty."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) == 0 or len(b) == 0:
        return None
    # The p-value is not reported: the asymptotic one costs nothing, the exact one can take a while.
    return float(stats.ks_2samp(a, b, method="asymp").statistic)


def age_bins() -> list[str]:
    return [f"{lo}-{hi - 1}" for lo, hi in pairwise(AGE_EDGES)] + ["unknown"]


def age_bands(ages: pd.Series) -> pd.Series:
    """Each age's band of ``age_bins`` ([lo, hi) between ``AGE_EDGES``), "unknown" when missing or outside them."""
    bands = pd.cut(pd.to_numeric(ages), AGE_EDGES, right=False, labels=age_bins()[:-1])
    return bands.cat.add_categories("unknown").fillna("unknown")


def rating_bins(values: np.ndarray) -> pd.Series:
    return pd.Series(np.clip(np.floor(np.asarray(values, float)), 1, 9).astype(int).astype(str))


# ------------------------------------------------------------------------------------ reference
def _norm_country(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        return "unknown"
    return value.strip().lower()


def check_run_dir(run_dir: Path) -> None:
    """``DriftInputError`` unless ``run_dir`` has what the reference is built from."""
    data = run_dir / layout.DATA_DIR
    needed = [data / layout.DATA_RATINGS, data / layout.DATA_USERS]
    missing = [str(p) for p in needed if not p.exists()]
    missing += [str(run_dir / name) for name in ModelFolder(run_dir).missing(serving=True)]
    if missing:
        raise DriftInputError(f"--run {run_dir} is not a complete training run folder; missing: {', '.join(missing)}")


def load_reference(run_dir: Path) -> dict[str, Any]:
    """Held-out ratings of the run with their users' age and country, and the model's predictions
    on the warm ones (val + test)."""
    check_run_dir(run_dir)
    data = run_dir / layout.DATA_DIR
    ratings = pq.read_table(data / layout.DATA_RATINGS, columns=["user_id", "isbn", "rating", "split"]).to_pandas()
    held = ratings[ratings["split"].isin(HELD_OUT)].reset_index(drop=True)
    users = pq.read_table(data / layout.DATA_USERS, columns=["user_id", "country", "age"]).to_pandas()
    held = held.merge(users, on="user_id", how="left")
    return {"held_out": held, "predictions": reference_predictions(run_dir, held)}


def reference_predictions(run_dir: Path, held: pd.DataFrame) -> np.ndarray:
    """The shipped model's ratings of the warm held-out pairs, with the features serving uses."""
    warm = held[held["split"].isin(("val", "test"))]
    catalog = ModelFolder(run_dir).load_catalog()
    scorer = Scorer(ModelFolder(run_dir).load_rating_model(), catalog.book_feats)
    out = []
    for start in range(0, len(warm), 16384):
        part = warm.iloc[start : start + 16384]
        u = catalog.user_feats[catalog.user_rows(part["user_id"].tolist())]
        b = catalog.book_feats[catalog.book_rows(part["isbn"].tolist())]
        out.append(scorer.rate(u, b).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# -------------------------------------------------------------------------------------- traffic
def sample_files(path: Path) -> list[Path]:
    """The sample files under ``path`` (a file, or a folder with ``drift-sample*.jsonl*``)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob("drift-sample*.jsonl*") if p.is_file())
        if files:
            return files
        raise DriftInputError(f"--requests {path}: no drift-sample*.jsonl files in this folder")
    raise DriftInputError(f"--requests {path}: no such file or folder")


def load_requests(paths: list[Path]) -> pd.DataFrame:
    """Every sampled request (bad lines are counted and skipped)."""
    rows, bad = [], 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict) and row.get("action") in ("rate", "recommend") and "user_known" in row:
                rows.append(row)
            else:
                bad += 1
    if bad:
        log.warning("skipped %d unreadable lines of the request sample", bad)
    if not rows:
        raise DriftInputError(f"--requests: no request samples in {', '.join(map(str, paths))}")
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------- check
def compare(
    name: str, ref: pd.Series, traffic: pd.Series, bins: list[str], min_samples: int, threshold: float, **extra: Any
) -> FeatureResult:
    r, t = shares(ref, bins), shares(traffic, bins)
    result = FeatureResult(name, None, len(traffic), len(ref), bins, r.round(4).tolist(), t.round(4).tolist(), **extra)
    if len(traffic) < min_samples:
        result.verdict = "too few samples"
        return result
    result.psi = psi(r, t)
    result.verdict = "drift" if result.psi > threshold else "moderate" if result.psi > WARN_PSI else "stable"
    return result


def embedding_results(
    run_dir: Path, held: pd.DataFrame, traffic: pd.DataFrame, min_samples: int, threshold: float
) -> list[FeatureResult]:
    """Book text embeddings of the traffic against the held-out books', along the reference's
    first principal components (new books' texts re-embedded with the run's encoder)."""
    catalog = ModelFolder(run_dir).load_catalog()
    emb, index = catalog.book_emb.numpy(), catalog.book_index
    ref = emb[[index[i] for i in held["isbn"] if i in index]]
    isbns = [i for row in traffic.get("isbns", pd.Series(dtype=object)).dropna() for i in row]
    texts = [t for row in traffic.get("new_book_texts", pd.Series(dtype=object)).dropna() for t in row]
    parts = [emb[[index[i] for i in isbns if i in index]]]
    if texts:
        parts.append(ModelFolder(run_dir).load_encoder().embed(texts))
    got = np.concatenate(parts) if parts else np.zeros((0, emb.shape[1]), np.float32)
    mean = ref.mean(axis=0)
    _, _, vt = np.linalg.svd(ref[:20000] - mean, full_matrices=False)
    out = []
    for k in range(min(PCS, vt.shape[0])):
        r_proj, t_proj = (ref - mean) @ vt[k], (got - mean) @ vt[k] if len(got) else np.zeros(0)
        edges = np.unique(np.quantile(r_proj, np.linspace(0, 1, 11)[1:-1]))
        labels = [f"d{i + 1}" for i in range(len(edges) + 1)]
        res = compare(
            f"book text embedding PC{k + 1}",
            pd.Series(np.array(labels)[np.searchsorted(edges, r_proj)]),
            pd.Series(np.array(labels)[np.searchsorted(edges, t_proj)] if len(t_proj) else [], dtype=object),
            labels,
            min_samples,
            threshold,
            ks=ks_statistic(r_proj, t_proj),
        )
        out.append(res)
    return out


def check(
    run_dir: Path, request_paths: list[Path], threshold: float = 0.25, min_samples: int = 50
) -> tuple[DriftReport, pd.DataFrame]:
    """Compare the request sample with the run's held-out data; returns the report."""
    check_run_dir(run_dir)  # cheap checks first: the reference takes a while
    traffic = load_requests(request_paths)
    ref = load_reference(run_dir)
    held, predictions = ref["held_out"], ref["predictions"]
    report = DriftReport(
        str(run_dir),
        [str(p) for p in request_paths],
        len(traffic),
        _period(traffic),
        threshold,
    )
    add = report.features.append

    add(
        compare(
            "user age",
            age_bands(held["age"]),
            age_bands(traffic["age"]),
            age_bins(),
            min_samples,
            threshold,
            ks=ks_statistic(held["age"].dropna(), traffic["age"].dropna()),
        )
    )
    countries = held["country"].map(_norm_country)
    top = [c for c in countries.value_counts().index if c != "unknown"][:TOP_COUNTRIES]

    def country_bin(c: Any) -> str:
        c = _norm_country(c)
        return c if c in top or c == "unknown" else "other"

    add(
        compare(
            "user country",
            countries.map(country_bin),
            traffic["country"].map(country_bin),
            [*top, "other", "unknown"],
            min_samples,
            threshold,
        )
    )
    new_user_ref = held["split"].isin(NEW_USER_SPLITS).map({True: "new", False: "known"})
    new_user = traffic["user_known"].map({True: "known", False: "new"})
    add(compare("new-user share", new_user_ref, new_user, ["new", "known"], min_samples, threshold))

    rate = traffic[traffic["action"] == "rate"]
    new_book_ref = held["split"].isin(NEW_BOOK_SPLITS).map({True: "new", False: "known"})
    n_new = int(rate["new_books"].sum()) if len(rate) else 0
    n_all = int(rate["books"].sum()) if len(rate) else 0
    new_book = pd.Series(["new"] * n_new + ["known"] * (n_all - n_new), dtype=object)
    add(compare("new-book share", new_book_ref, new_book, ["new", "known"], min_samples, threshold))

    for res in embedding_results(run_dir, held, rate, min_samples, threshold):
        add(res)

    ratings = np.array([v for row in rate["ratings"] for v in row], float) if len(rate) else np.zeros(0)
    add(
        compare(
            "predicted rating (rate)",
            rating_bins(predictions),
            rating_bins(ratings),
            [str(k) for k in range(1, 10)],
            min_samples,
            threshold,
            ks=ks_statistic(predictions, ratings),
        )
    )
    return report, traffic


def _period(traffic: pd.DataFrame) -> tuple[str | None, str | None]:
    if "ts" not in traffic or traffic["ts"].isna().all():
        return None, None

    def fmt(ts: float) -> str:
        return datetime.fromtimestamp(float(ts), UTC).isoformat(timespec="seconds")

    return fmt(traffic["ts"].min()), fmt(traffic["ts"].max())


# --------------------------------------------------------------------------------------- output
def markdown(report: DriftReport) -> str:
    status = f"**DRIFT** in: {', '.join(report.drifted)}" if report.drifted else "no drift"
    lines = [
        "# Drift report",
        "",
        f"Run: `{report.run}`. Requests sampled: {report.n_requests} ({report.period[0]} to {report.period[1]}).",
        f"Reference: the run's held-out ratings (cold-start users and books as new). PSI threshold "
        f"{report.psi_threshold} (moderate above {WARN_PSI}). Result: {status}.",
        "",
        "| feature | traffic n | reference n | PSI | KS | verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for f in report.features:
        value = "–" if f.psi is None else f"{f.psi:.3f}"
        ks = "–" if f.ks is None else f"{f.ks:.3f}"
        verdict = f"**{f.verdict}**" if f.verdict == "drift" else f.verdict
        lines.append(f"| {f.name} | {f.n_traffic} | {f.n_reference} | {value} | {ks} | {verdict} |")
    lines += ["", "Bin shares (reference -> traffic):", ""]
    for f in report.features:
        pairs = ", ".join(f"{b}: {r:.3f}->{t:.3f}" for b, r, t in zip(f.bins, f.reference, f.traffic, strict=True))
        lines.append(f"- {f.name}: {pairs}")
    return "\n".join(lines) + "\n\n![bins](drift.png)\n"


def plot(report: DriftReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report.features)
    cols = 3
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, f in zip(axes.flat, report.features, strict=False):
        x = np.arange(len(f.bins))
        ax.bar(x - 0.2, f.reference, 0.4, label="reference")
        ax.bar(x + 0.2, f.traffic, 0.4, label="traffic", color="tab:red" if f.verdict == "drift" else "tab:orange")
        ax.set_xticks(x, f.bins, rotation=45, ha="right", fontsize=7)
        title = f"{f.name}: PSI {f.psi:.3f}" if f.psi is not None else f"{f.name}: {f.verdict}"
        ax.set_title(title, fontsize=9, color="tab:red" if f.verdict == "drift" else "black")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(report: DriftReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.md").write_text(markdown(report))
    payload = {**asdict(report), "drifted": report.drifted}
    (out / "drift.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(report, out / "drift.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.drift", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="training run folder of the served model")
    parser.add_argument("--requests", required=True, type=Path, nargs="+", help="request sample file(s) or folder(s)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default RUN/drift)")
    parser.add_argument("--psi", type=float, default=0.25, help="PSI above which a feature has drifted (0.25)")
    parser.add_argument("--min-samples", type=int, default=50, help="traffic values a feature needs to be judged")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        paths = [p for path in args.requests for p in sample_files(path)]
        report, _ = check(args.run, paths, args.psi, args.min_samples)
    except DriftInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.run / "drift"
    write(report, out)
    print(markdown(report).split("\n\nBin shares")[0])
    print(f"report: {out / 'drift.md'}")
    if report.drifted:
        print(f"drift: {', '.join(report.drifted)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
