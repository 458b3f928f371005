"""The ``distill`` step: train (or reuse) the BERT-tiny student that ``encoder.name: distilled`` names.

A student is kept in ``distill.cache_dir`` under a hash of its corpus, the teacher's weights, the
student's shape and vocabulary and the distill settings, so a rerun on the same corpus and teacher
copies it instead of training again. The run folder gets a copy (``distill/student``) and the
report (``distill/distill.json``: held-out cosine to the teacher, time, teacher throughput).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from model import layout
from model.artifacts import resolve_device
from model.encoder import TextEncoder, load_saved_encoder
from model.text import USER_TEXT_PREFIX
from train.config import DISTILLED, Config
from train.features.distill.corpus import build_corpus
from train.features.distill.student import (
    Projection,
    build_student,
    cosines,
    fit_student,
    init_from_teacher,
    mean_cosine,
)
from train.features.embed import EmbeddingCache
from train.features.encoders import EncoderUnavailable, load_encoder
from train.run_context import RunContext

log = logging.getLogger("bookrec.distill")


def uses_student(cfg: Config) -> bool:
    """Whether the run embeds with a distilled student (``encoder.random_init`` still wins)."""
    return cfg.encoder.name == DISTILLED and not cfg.encoder.random_init


def configured_encoder(cfg: Config, run_dir: Path, corpus: list[str] | None = None) -> TextEncoder:
    """The encoder the features step embeds with: the run's student for ``distilled``, else ``encoder.name``."""
    if not uses_student(cfg):
        return load_encoder(cfg.encoder, corpus=corpus)
    folder = run_dir / layout.DISTILL_DIR / layout.DISTILL_STUDENT
    if not (folder / layout.ENCODER_META).is_file():
        raise EncoderUnavailable(
            f"encoder.name is '{DISTILLED}' but {folder} holds no student: run `python -m train distill` first"
        )
    return load_saved_encoder(folder)


def _student_shape_digest(cfg: Config) -> str:
    h = hashlib.sha256(f"{cfg.encoder.pooling}|{cfg.encoder.max_length}".encode())
    if cfg.distill.student_config_dir:
        for name in ("config.json", "vocab.txt"):
            path = Path(cfg.distill.student_config_dir) / name
            h.update(path.read_bytes() if path.is_file() else b"-")
    return h.hexdigest()


def _cache_key(cfg: Config, corpus_digest: str, teacher: TextEncoder) -> str:
    settings = {k: v for k, v in cfg.distill.model_dump().items() if k != "cache_dir"}
    payload = json.dumps(
        [settings, corpus_digest, teacher.fingerprint(), _student_shape_digest(cfg)], sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cosine_by_kind(texts: list[str], student: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mean cosine to the target over user texts and over book texts apart (users' are simpler)."""
    cos = cosines(student, target)
    users = np.array([t.startswith(USER_TEXT_PREFIX) for t in texts], dtype=bool)
    kinds = (("books", ~users), ("users", users))
    return {kind: round(float(cos[mask].mean()), 4) for kind, mask in kinds if mask.any()}


def _copy_into_run(cached: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(cached, out)
    return json.loads((out / layout.DISTILL_REPORT).read_text())


def step_distill(run: RunContext, progress: bool = True) -> dict:
    """Distil ``distill.teacher`` into a BERT-tiny student on the run's texts (only for ``encoder.name: distilled``)."""
    cfg = run.cfg
    out = run.dir / layout.DISTILL_DIR
    if not uses_student(cfg):
        # A report all the same, so the step's output exists whichever encoder runs (DVC tracks it).
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        report = {"skipped": f"the run's encoder is not a student (encoder.name '{cfg.encoder.name}')"}
        (out / layout.DISTILL_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        return report
    dc = cfg.distill
    users, books, ratings = run.tables()
    corpus = build_corpus(books, users, ratings, dc.holdout_frac, dc.request_forms, dc.max_train_texts, dc.seed)
    teacher_cfg = cfg.encoder.replace(name=dc.teacher, random_init=False, fallback_random_init=False)
    teacher = load_encoder(teacher_cfg)
    key = _cache_key(cfg, corpus.digest(), teacher)
    cached = Path(dc.cache_dir) / key
    if (cached / layout.DISTILL_REPORT).is_file():
        report = _copy_into_run(cached, out)
        log.info("distill: reusing the student cached in %s", cached)
        return {**report, "cached": True}

    device = resolve_device(cfg.train.device)
    start = time.perf_counter()
    embeddings = EmbeddingCache(Path(cfg.encoder.cache_dir))
    teacher.model.to(device)
    t_train, train_stats = embeddings.embed(teacher, corpus.train, cfg.encoder.batch_size, progress)
    t_held, held_stats = embeddings.embed(teacher, corpus.heldout, cfg.encoder.batch_size, progress)
    teacher.model.cpu()
    teacher_seconds = time.perf_counter() - start

    student = build_student(dc, teacher, cfg.encoder.max_length, cfg.encoder.pooling)
    projection = Projection.fit(t_train, student.dim)
    matched = init_from_teacher(student, teacher, projection)
    fit = fit_student(student, corpus.train, projection.target(t_train), dc, device, progress)
    held = student.embed(corpus.heldout, cfg.encoder.batch_size)
    stride = max(1, len(corpus.train) // max(1, len(corpus.heldout)))  # as many training texts as held-out
    train_cosine = mean_cosine(student.embed(corpus.train[::stride]), projection.target(t_train[::stride]))
    report = {
        "teacher": teacher.source,
        "student": f"bert-tiny {student.model.config.num_hidden_layers}x{student.dim}",
        "key": key,
        "texts": {"train": len(corpus.train), "heldout": len(corpus.heldout)},
        "pca": {"dim": student.dim, "explained_variance": round(projection.explained, 4)},
        "tokens_initialised_from_teacher": matched,
        # Cosine of the student's embedding to the teacher's: in the target (PCA) space, and mapped
        # back into the teacher's space, against what the projection alone keeps (the ceiling).
        "heldout_cosine_pca": round(mean_cosine(held, projection.target(t_held)), 4),
        "heldout_cosine_teacher": round(mean_cosine(projection.back(held), t_held), 4),
        "heldout_cosine_ceiling": round(mean_cosine(projection.back(projection.target(t_held)), t_held), 4),
        "heldout_cosine_pca_by_kind": cosine_by_kind(corpus.heldout, held, projection.target(t_held)),
        "train_cosine_pca": round(train_cosine, 4),
        "epochs": fit.epochs,
        "teacher_embedding": {
            "seconds": round(teacher_seconds, 1),
            "texts_embedded": train_stats["unique_new"] + held_stats["unique_new"],
            "texts_per_s": round(max(train_stats["texts_per_s"], held_stats["texts_per_s"]), 1),
        },
        "train_seconds": round(fit.seconds, 1),
        "train_texts_per_s": round(fit.texts_per_s, 1),
        "device": str(device),
    }
    student.source = f"distilled:{dc.teacher}:{key}"
    tmp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save(tmp / layout.DISTILL_STUDENT)
    (tmp / layout.DISTILL_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(cached, ignore_errors=True)
    tmp.rename(cached)
    _copy_into_run(cached, out)
    log.info("distill: %s", {k: report[k] for k in ("texts", "heldout_cosine_pca", "train_seconds")})
    return {**report, "cached": False}
