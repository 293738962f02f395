"""A source tokenized once into flat files of token ids (train.bin, val.bin) that batches read through
np.memmap: a corpus of any size costs page cache, not RAM, and a restart (or a second trainer on the
same machine) reuses it. Building streams documents and writes tokens as they come.

The folder's name is a hash of everything that shapes the tokens (the files' names, sizes and mtimes,
the column, the tokenizer's content, the byte limit), so changed data or another tokenizer builds a
new cache instead of reading a stale one. $RESBM_DATA_CACHE moves it (default ~/.cache/resbm-swarm/tokens).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from swarm.config import ConfigError

FORMAT = 1
FLUSH_BYTES = 2 << 20  # tokenize this much text at a time (the tokenizers batch encoder likes batches)
SPLITS = ("train", "val")


def default_dir() -> Path:
    return Path(os.environ.get("RESBM_DATA_CACHE") or Path.home() / ".cache" / "resbm-swarm" / "tokens")


def token_dtype(vocab_size: int):
    """The narrowest unsigned type that holds every id (uint8 for bytes, uint16 up to 65536 tokens)."""
    return np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True).encode()).hexdigest()[:20]


def is_validation(key: str, val_percent: int) -> bool:
    return hashlib.sha1(key.encode()).digest()[0] * 100 // 256 < val_percent


def open_splits(folder: Path) -> tuple[dict, dict]:
    """The memory-mapped splits and the build's summary (meta.json)."""
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return {s: np.memmap(folder / f"{s}.bin", dtype=dtype, mode="r") if meta["tokens"][s] else np.zeros(0, dtype)
            for s in SPLITS}, meta


def build(folder: Path, docs, tokenizer, val_percent: int, max_bytes: int, name: str) -> Path:
    """Tokenize `docs` into `folder` (atomically: a half-built cache is never read); returns folder."""
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = token_dtype(tokenizer.vocab_size)
    meta = {"name": name, "tokenizer": tokenizer.name, "dtype": np.dtype(dtype).name, "documents": 0,
            "bytes_read": 0, "capped": False, "tokens": dict.fromkeys(SPLITS, 0)}
    outs = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}
    try:
        _write_all(docs, tokenizer, outs, meta, val_percent, max_bytes, dtype)
    finally:
        for f in outs.values():
            f.close()
    if not meta["tokens"]["train"] + meta["tokens"]["val"]:
        shutil.rmtree(tmp)
        raise ConfigError(f"data {name}: no text in it")
    if not meta["tokens"]["val"]:
        _tail_to_validation(tmp, meta, val_percent, dtype)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process on this machine built the same cache first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_all(docs, tokenizer, outs, meta, val_percent, max_bytes, dtype) -> None:
    pending, size = [], 0
    for key, text, split in docs:
        n = len(text) if isinstance(text, bytes) else len(text.encode())
        if max_bytes and meta["bytes_read"] + n > max_bytes:
            text, n = _clip(text, max_bytes - meta["bytes_read"]), max_bytes - meta["bytes_read"]
            meta["capped"] = True
        pending.append((split or ("val" if is_validation(key, val_percent) else "train"), text))
        meta["bytes_read"] += n
        meta["documents"] += 1
        size += n
        if size >= FLUSH_BYTES or meta["capped"]:
            _flush(pending, tokenizer, outs, meta, dtype)
            pending, size = [], 0
        if meta["capped"]:  # (swarm/data.py logs it whenever the cache is opened)
            return
    _flush(pending, tokenizer, outs, meta, dtype)


def _clip(text, limit: int):
    return text[:limit] if isinstance(text, bytes) else text.encode()[:limit].decode("utf-8", errors="ignore")


def _flush(pending, tokenizer, outs, meta, dtype) -> None:
    if not pending:
        return
    for (split, _), ids in zip(pending, tokenizer.encode_documents([t for _, t in pending])):
        outs[split].write(ids.astype(dtype, copy=False).tobytes())
        meta["tokens"][split] += len(ids)


def _tail_to_validation(folder: Path, meta: dict, val_percent: int, dtype) -> None:
    """No document drew validation (one file, or a few): its last val_percent of tokens are."""
    n = meta["tokens"]["train"]
    cut = n * (100 - val_percent) // 100
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    with open(folder / "val.bin", "wb") as out:
        for start in range(cut, n, FLUSH_BYTES):  # in pieces: 5% of a huge file is still huge
            out.write(train[start:min(n, start + FLUSH_BYTES)].tobytes())
    del train
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(cut * np.dtype(dtype).itemsize)
    meta["tokens"] = {"train": cut, "val": n - cut}
