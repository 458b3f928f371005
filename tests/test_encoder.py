"""The text encoder: explicit random init, offline failure, pooling, saving, the embedding cache."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from model import layout
from model.artifacts import ModelFolder
from model.encoder import ScriptedTextEncoder, TextEncoder, load_saved_encoder, load_serving_encoder
from train.config import EncoderConfig
from train.features.embed import EmbeddingCache
from train.features.encoders import EncoderUnavailable, load_encoder
from train.features.scripted import ScriptedEncoderMismatch, check_scripted, save_scripted

from .conftest import REPO, SHARED

CORPUS = [
    "The Dragon Queen by Ann Smith, 1999, Tor",
    "Murder at Midnight by Bob Jones, 2001, Penguin",
    "reader from paris, ile de france, france, age 34",
    "reader from toronto, ontario, canada, age unknown",
] * 5


def _random(**kw) -> EncoderConfig:
    return EncoderConfig(random_init=True, vocab_size=300, **kw)


def test_pretrained_encoder_fails_fast_and_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(EncoderUnavailable, match="random_init: true") as err:
        load_encoder(EncoderConfig(name="prajjwal1/bert-tiny"))
    assert "prajjwal1/bert-tiny" in str(err.value)
    assert time.perf_counter() - start < 30
    with pytest.raises(EncoderUnavailable, match="folder"):
        load_encoder(EncoderConfig(name=str(tmp_path)))


def test_random_init_is_seeded_and_says_so():
    a, b, c = (load_encoder(_random(seed=s), corpus=CORPUS) for s in (0, 0, 1))
    assert a.source.startswith("random-init:seed=0")
    assert a.dim == 128 and a.model.config.num_hidden_layers == 2
    ea, eb, ec = (e.embed(CORPUS[:4]) for e in (a, b, c))
    np.testing.assert_array_equal(ea, eb)
    assert not np.allclose(ea, ec)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_random_init_needs_a_vocab_source():
    with pytest.raises(EncoderUnavailable, match="corpus"):
        load_encoder(_random())


@pytest.mark.skipif(not (SHARED / "data" / "bert-tiny" / "vocab.txt").is_file(), reason="no shared BERT-tiny folder")
def test_random_init_from_the_bert_tiny_folder_uses_its_vocab():
    enc = load_encoder(_random(config_dir=str(SHARED / "data" / "bert-tiny")))
    assert len(enc.tokenizer) == 30522
    assert enc.tokenizer.tokenize("Murder at midnight") == ["murder", "at", "midnight"]


def test_pooling_batching_and_save_round_trip(tmp_path):
    mean = load_encoder(_random(), corpus=CORPUS)
    cls = load_encoder(_random(pooling="cls"), corpus=CORPUS)
    texts = CORPUS[:4]
    assert not np.allclose(mean.embed(texts), cls.embed(texts))
    # padding to the batch's longest text must not change a text's embedding
    np.testing.assert_allclose(mean.embed(texts, batch_size=1), mean.embed(texts, batch_size=4), atol=1e-5)
    mean.save(tmp_path / "enc")
    again = load_saved_encoder(tmp_path / "enc")
    assert again.source == mean.source and again.pooling == "mean"
    np.testing.assert_allclose(again.embed(texts), mean.embed(texts), atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        load_encoder(_random(pooling="max"), corpus=CORPUS)


def test_embedding_cache_skips_known_texts(tmp_path):
    enc = load_encoder(_random(), corpus=CORPUS)
    first, stats = EmbeddingCache(tmp_path).embed(enc, CORPUS, progress=False)
    assert stats["unique_new"] == 4 and first.shape == (20, 128)
    again, stats = EmbeddingCache(tmp_path).embed(enc, [*CORPUS, "a new text"], progress=False)
    assert stats["unique_new"] == 1
    np.testing.assert_array_equal(again[:20], first)
    other = load_encoder(_random(seed=5), corpus=CORPUS)  # another encoder never reuses these keys
    _, stats = EmbeddingCache(tmp_path).embed(other, CORPUS, progress=False)
    assert stats["unique_new"] == 4


# Empty, one letter, accented and non-Latin, and far past max_length (truncated), mixed in one batch.
SERVING_TEXTS = [
    "",
    "a",
    *CORPUS[:4],
    "Crème brûlée à Zürich — naïve CAFÉ 東京",
    "The Dragon Queen by Ann Smith, 1999, Tor. " * 40,
    "q" * 700,
]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_the_scripted_encoder_gives_the_transformers_tokens_and_vectors(tmp_path, pooling):
    """What the worker loads (the trace and the ``tokenizers`` tokenizer) reproduces the encoder:
    the same token ids, truncation included, and embeddings within 1e-5 in any batching."""
    enc = load_encoder(_random(pooling=pooling, max_length=32), corpus=CORPUS)
    enc.save(tmp_path)
    save_scripted(enc, tmp_path)
    served = load_serving_encoder(tmp_path)
    assert isinstance(served, ScriptedTextEncoder)
    assert (served.dim, served.pooling, served.max_length, served.source) == (
        enc.dim,
        pooling,
        32,
        enc.source,
    )
    ids = [e.ids for e in served.tokenizer.encode_batch(SERVING_TEXTS)]
    assert ids == enc.tokenizer(SERVING_TEXTS, padding=True, truncation=True, max_length=32)["input_ids"]
    assert max(sum(e.attention_mask) for e in served.tokenizer.encode_batch(SERVING_TEXTS)) == 32
    reference = enc.embed(SERVING_TEXTS)
    for batch_size in (1, 4, 256):
        assert np.abs(served.embed(SERVING_TEXTS, batch_size=batch_size) - reference).max() < 1e-5
    assert served.embed([]).shape == (0, enc.dim)


@pytest.mark.skipif(not (SHARED / "data" / "bert-tiny" / "vocab.txt").is_file(), reason="no shared BERT-tiny folder")
def test_the_scripted_encoder_tokenizes_as_transformers_with_the_bert_vocabulary(tmp_path):
    enc = load_encoder(_random(config_dir=str(SHARED / "data" / "bert-tiny")))
    enc.save(tmp_path)
    save_scripted(enc, tmp_path)
    served = ScriptedTextEncoder.load(tmp_path)
    ids = [e.ids for e in served.tokenizer.encode_batch(SERVING_TEXTS)]
    assert ids == enc.tokenizer(SERVING_TEXTS, padding=True, truncation=True, max_length=enc.max_length)["input_ids"]
    assert np.abs(served.embed(SERVING_TEXTS) - enc.embed(SERVING_TEXTS)).max() < 1e-5


def test_a_scripted_encoder_of_other_weights_is_refused(tmp_path):
    """The check ``save_scripted`` runs fails on a trace that is not the encoder's."""
    enc, other = (load_encoder(_random(seed=s), corpus=CORPUS) for s in (0, 1))
    enc.save(tmp_path)
    save_scripted(enc, tmp_path)
    with pytest.raises(ScriptedEncoderMismatch, match="embeddings differ"):
        check_scripted(other, ScriptedTextEncoder.load(tmp_path))


def test_a_folder_saved_without_the_scripted_form_serves_through_transformers(tmp_path, caplog):
    """An encoder saved before the scripted form existed still loads (and says how to add it)."""
    enc = load_encoder(_random(), corpus=CORPUS)
    enc.save(tmp_path)
    with caplog.at_level("WARNING", logger="bookrec.encoder"):
        served = load_serving_encoder(tmp_path)
    assert isinstance(served, TextEncoder)
    assert "export-encoder" in caplog.text
    np.testing.assert_allclose(served.embed(CORPUS[:4]), enc.embed(CORPUS[:4]), atol=1e-6)


def test_export_encoder_adds_the_scripted_form_to_a_run_saved_without_it(tiny_run, tmp_path):
    """``python -m train export-encoder RUN`` on a run whose encoder predates the scripted form:
    the trace is written, the manifest rewritten, and the folder verifies and serves without transformers."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("data", "distill"))
    (run / layout.ENCODER_DIR / layout.ENCODER_SCRIPTED).unlink()
    ModelFolder(run).write_manifest()  # as the older training wrote it
    assert isinstance(ModelFolder(run).load_encoder(), TextEncoder)
    proc = subprocess.run(
        [sys.executable, "-m", "train", "export-encoder", str(run)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert layout.ENCODER_SCRIPTED in proc.stdout and layout.MANIFEST_FILE in proc.stdout
    folder = ModelFolder(run)
    folder.verify(serving=True)
    assert layout.encoder_path(layout.ENCODER_SCRIPTED) in folder.read_manifest()["files"]
    assert isinstance(folder.load_encoder(), ScriptedTextEncoder)
