"""Where a run's text comes from, one document at a time (no corpus is ever held in RAM whole).

    stdlib[:X.Y]      this Python's standard library sources (X.Y: the version the run was made with)
    <file or folder>  text files (.txt, .py, .md, ...) cut into ~1 MiB documents at line breaks,
                      .jsonl (one document per line, its `column` field), .parquet (one per row)
    hf:<name>[:<cfg>] a Hugging Face dataset, streamed with `datasets` (imported only when asked for)

A document is (key, text, split): the key is stable across machines (a path relative to the data's
root plus a position), and split is "val"/"train" when the source says so (a dataset's validation
split), else None: then the key's hash decides (swarm/token_cache.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

from swarm.config import ConfigError

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".html", ".csv")
TABLE_SUFFIXES = (".jsonl", ".parquet")
BLOCK_BYTES = 1 << 20  # a long text file becomes documents of about this size
SKIP_DIRS = ("__pycache__", "site-packages", ".git")
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def resolve_spec(spec: str) -> str:
    """`stdlib` pinned to this Python's version (its sources differ between versions)."""
    return f"stdlib:{PYTHON}" if spec == "stdlib" else spec


def local_root(spec: str) -> Path:
    """The folder or file of a local spec; a stdlib of another Python version is refused by name."""
    if spec.startswith("stdlib"):
        version = spec.partition(":")[2] or PYTHON
        if version != PYTHON:
            raise ConfigError(f"this run trains on the standard library of Python {version}, and this node runs "
                              f"Python {PYTHON}: use Python {version}, or give the trainer a copy of that "
                              f"library's sources with --data")
        return Path(sysconfig.get_paths()["stdlib"])
    return Path(spec)


def files(root: Path) -> list[Path]:
    """The data files of a file or folder, in a stable order."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ConfigError(f"data {str(root)!r} is neither a file nor a folder (nor stdlib or hf:<dataset>)")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        out += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(TEXT_SUFFIXES + TABLE_SUFFIXES)]
    if not out:
        raise ConfigError(f"no data files ({', '.join(TEXT_SUFFIXES + TABLE_SUFFIXES)}) under {root}")
    return out


def listing(root: Path, with_mtime: bool = False) -> list:
    """(relative path, size[, mtime]) of every data file: what identifies local data cheaply."""
    return [[_rel(f, root), *((st.st_size, st.st_mtime_ns) if with_mtime else (st.st_size,))]
            for f in files(root) for st in [f.stat()]]


def identity(spec: str, with_mtime: bool = False) -> str:
    """A short hash of what the data is: the files' names and sizes (a copy elsewhere agrees), or for a
    hub dataset its name (its content cannot be checked without reading all of it)."""
    what = spec if spec.startswith("hf:") else listing(local_root(spec), with_mtime)
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def _rel(path: Path, root: Path) -> str:
    """A file's name relative to the data's root; "" for a single file, so that a copy under another
    name is the same data (its documents' keys, hence the train/validation split, do not change)."""
    return "" if path == root else path.relative_to(root).as_posix()


def documents(spec: str, column: str):
    """Every document of the source, streamed: (key, text as str or bytes, split or None)."""
    if spec.startswith("hf:"):
        yield from _hf_documents(spec[3:], column)
        return
    root = local_root(spec)
    for f in files(root):
        rel = _rel(f, root)
        reader = _jsonl if f.suffix == ".jsonl" else _parquet if f.suffix == ".parquet" else _text_blocks
        for i, text in enumerate(reader(f, column)):
            yield f"{rel}:{i}", text, None


def _text_blocks(path: Path, column: str):
    """Blocks of ~BLOCK_BYTES, cut after a line break so that a tokenizer sees whole lines."""
    with open(path, "rb") as fh:
        rest = b""
        while block := fh.read(BLOCK_BYTES):
            block = rest + block
            cut = block.rfind(b"\n") + 1 or len(block)
            rest = block[cut:]
            yield block[:cut]
        if rest:
            yield rest


def _jsonl(path: Path, column: str):
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not a JSON line ({e})") from None
            yield _column_text(row, column, f"{path}:{n}")


def _column_text(row, column: str, where: str) -> str:
    if not isinstance(row, dict) or column not in row:
        fields = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ConfigError(f"{where}: no {column!r} field (it has {fields}); choose the text field with --data-column")
    text = row[column]
    if not isinstance(text, str):
        raise ConfigError(f"{where}: field {column!r} holds {type(text).__name__}, not text")
    return text


def _parquet(path: Path, column: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading .parquet needs pyarrow (pip install 'resbm-swarm[parquet]')") from None
    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise ConfigError(f"{path}: no column {column!r} (it has {pf.schema_arrow.names}); choose one with "
                          f"--data-column")
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):  # one row group slice at a time
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _hf_documents(spec: str, column: str):
    """Rows of a hub dataset's train (and, if it has one, validation) split, streamed."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("--data hf:... needs the Hugging Face `datasets` package "
                          "(pip install 'resbm-swarm[hf]')") from None
    name, _, config = spec.partition(":")
    splits = datasets.get_dataset_split_names(name, config or None)
    if "train" not in splits:
        raise ConfigError(f"dataset {name!r} has no train split (it has {splits})")
    for split in ("train", "validation"):
        if split not in splits:
            continue
        forced = ("val" if split == "validation" else "train") if "validation" in splits else None
        stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
        for i, row in enumerate(stream):
            yield f"{split}:{i}", _column_text(row, column, f"dataset {name} ({split}, row {i})"), forced
