"""A run's training text as token ids, with deterministic batches.

A Corpus is a source (swarm/sources.py: stdlib, a local file or folder of text/.jsonl/.parquet, or
hf:<dataset>) read through a tokenizer (swarm/tokenizer.py) into a memory-mapped token cache
(swarm/token_cache.py), so it is tokenized once and never held in RAM whole. Batches are a pure
function of (seed, split, step, micro): a resumed run, a restarted trainer, or several trainers each
drawing its own micro indices (any non-negative int) all see the data `train-local` sees.

`resolve_data` fixes a run's data when the run is made (stdlib pinned to this Python's version, the
data's and tokenizer's hashes, the vocabulary size); `open_corpus` opens it on a node and refuses
data or a tokenizer that differs from the run's, by name.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from swarm.config import ConfigError, ModelConfig, RunConfig
from swarm.sources import documents, identity, resolve_spec
from swarm.token_cache import build, cache_key, default_dir, open_splits
from swarm.tokenizer import load_tokenizer

log = logging.getLogger("resbm.data")
VAL_PERCENT = 5


class Corpus:
    """Train and validation token streams of a source, tokenized once into the cache."""

    def __init__(self, data: str = "stdlib", *, column: str = "text", tokenizer="bytes", max_bytes: int = 0,
                 val_percent: int = VAL_PERCENT, cache_dir: str | Path | None = None):
        spec = resolve_spec(data)
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.vocab_size = self.tokenizer.vocab_size
        self.data_hash = identity(spec)
        self.name = spec if self.tokenizer.name == "bytes" else f"{spec} ({self.tokenizer.name})"
        key = cache_key(data=spec if spec.startswith("hf:") else identity(spec, with_mtime=True), column=column,
                        tokenizer=self.tokenizer.content_hash, max_bytes=max_bytes, val_percent=val_percent)
        folder = Path(cache_dir or default_dir()) / key
        if not (folder / "meta.json").exists():
            log.info("tokenizing %s into %s (once; later runs reuse it)", self.name, folder)
            build(folder, documents(spec, column), self.tokenizer, val_percent, max_bytes, self.name)
        self.folder = folder
        self.splits, self.meta = open_splits(folder)
        if self.meta["capped"]:
            log.warning("data %s: only its first %d bytes are used (--data-max-bytes)", self.name, max_bytes)

    def tokens(self, split: str) -> int:
        return len(self.splits[split])

    def batch(self, split: str, n: int, seq_len: int, seed: int, step: int, micro: int = 0):
        """(inputs, targets), each [n, seq_len] int64; deterministic in (seed, split, step, micro)."""
        data = self.splits[split]
        if len(data) <= seq_len + 1:
            raise ValueError(f"the {split} split of {self.name} has {len(data)} tokens, fewer than one sequence "
                             f"of {seq_len + 1}")
        key = hashlib.sha256(f"{seed}/{split}/{step}/{micro}".encode()).digest()  # stable across processes
        gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 2)
        starts = torch.randint(0, len(data) - seq_len - 1, (n,), generator=gen).tolist()
        chunk = torch.from_numpy(np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]


class ByteCorpus(Corpus):
    """Byte-level text of a local source (default: this Python's standard library)."""

    def __init__(self, source: str | None = None, val_percent: int = VAL_PERCENT, max_bytes: int = 0):
        super().__init__(source or "stdlib", val_percent=val_percent, max_bytes=max_bytes)


def resolve_data(run: RunConfig) -> RunConfig:
    """The run with its data fixed: stdlib pinned to this Python's version, the data's and the
    tokenizer's hashes, and the vocabulary size from the tokenizer (when left at the byte default)."""
    d = run.data
    spec = resolve_spec(d.data)
    tok = load_tokenizer(d.tokenizer)
    model = run.model
    if model.vocab_size == ModelConfig.vocab_size and tok.vocab_size != model.vocab_size:
        model = model.replace(vocab_size=tok.vocab_size)
    check_vocab(model, tok)
    data = dataclasses.replace(d, data=spec, data_hash=identity(spec), tokenizer_hash=tok.content_hash)
    return dataclasses.replace(run, model=model, data=data)


def check_vocab(model: ModelConfig, tokenizer) -> None:
    if model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"vocab_size={model.vocab_size} is smaller than the {tokenizer.vocab_size} tokens of "
                          f"tokenizer {tokenizer.name}: leave --vocab-size out (it follows the tokenizer) or "
                          f"raise it")


def open_corpus(run: RunConfig, data: str | None = None, tokenizer: str | None = None,
                cache_dir: str | Path | None = None) -> Corpus:
    """The run's corpus on this node. `data` and `tokenizer` say where this node keeps the run's data and
    tokenizer file when not at the run's paths; either is refused (ConfigError naming it) when it is
    not what the run was made with."""
    d = run.data
    corpus = Corpus(data or d.data, column=d.data_column, tokenizer=tokenizer or d.tokenizer,
                    max_bytes=d.data_max_bytes, cache_dir=cache_dir)
    wrong = []
    if d.data_hash and corpus.data_hash != d.data_hash:
        wrong.append(f"data: the run's is {d.data} (hash {d.data_hash}), this node's {data or d.data} is not "
                     f"(hash {corpus.data_hash}: other files or sizes)")
    if d.tokenizer_hash and corpus.tokenizer.content_hash != d.tokenizer_hash:
        wrong.append(f"tokenizer: the run's is {d.tokenizer} (hash {d.tokenizer_hash}), this node's "
                     f"{tokenizer or d.tokenizer} has hash {corpus.tokenizer.content_hash}")
    if wrong:
        raise ConfigError("this node's data differs from the run's; " + "; ".join(wrong))
    check_vocab(run.model, corpus.tokenizer)
    return corpus
