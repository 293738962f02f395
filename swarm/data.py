"""Byte-level text data that every machine has, with deterministic batches.

Default corpus: the Python standard library's own source files, read from the running
interpreter's installation, split into train/validation by file (a stable hash of the path).
Any local text file or folder works the same way. Batches are a pure function of
(seed, split, step, microbatch), so a resumed run or a restarted head draws the same data.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import torch

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".html", ".csv")


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"data path {root} is neither a file nor a folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "site-packages", ".git"))
        out += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(TEXT_SUFFIXES)]
    if not out:
        raise FileNotFoundError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {root}")
    return out


def _is_validation(path: Path, root: Path, val_percent: int) -> bool:
    digest = hashlib.sha1(str(path.relative_to(root) if path != root else path.name).encode()).digest()
    return digest[0] * 100 // 256 < val_percent


class ByteCorpus:
    """Train and validation byte streams of a text source, capped at `max_bytes` each."""

    def __init__(self, source: str | None = None, val_percent: int = 5, max_bytes: int = 32 << 20):
        if source and source.startswith("hf:"):
            self.name = source
            self.splits = _hf_splits(source[3:], val_percent, max_bytes)
            return
        root = Path(source) if source else Path(sysconfig.get_paths()["stdlib"])
        self.name = str(root) if source else "python-stdlib"
        files = _files(root)
        parts = {"train": [], "val": []}
        sizes = {"train": 0, "val": 0}
        for f in files:
            split = "val" if len(files) > 1 and _is_validation(f, root, val_percent) else "train"
            if sizes[split] >= max_bytes:
                continue
            data = f.read_bytes()[: max_bytes - sizes[split]]
            parts[split].append(data)
            sizes[split] += len(data)
        if len(files) == 1:  # a single file: its last val_percent is validation
            blob = parts["train"][0]
            cut = len(blob) * (100 - val_percent) // 100
            parts = {"train": [blob[:cut]], "val": [blob[cut:]]}
        self.splits = {k: torch.frombuffer(bytearray(b"".join(v)), dtype=torch.uint8) for k, v in parts.items()}

    def batch(self, split: str, n: int, seq_len: int, seed: int, step: int, micro: int = 0):
        """(inputs, targets), each [n, seq_len] int64; deterministic in (seed, split, step, micro)."""
        data = self.splits[split]
        if len(data) <= seq_len + 1:
            raise ValueError(f"the {split} split has {len(data)} bytes, fewer than one sequence of {seq_len + 1}")
        key = hashlib.sha256(f"{seed}/{split}/{step}/{micro}".encode()).digest()  # stable across processes
        gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 2)
        starts = torch.randint(0, len(data) - seq_len - 1, (n,), generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        chunk = data[idx].long()
        return chunk[:, :-1], chunk[:, 1:]


def _hf_splits(spec: str, val_percent: int, max_bytes: int) -> dict:
    """`hf:<dataset>[:<config>]`: the "text" column of a Hugging Face dataset, streamed, as bytes.
    Needs `pip install datasets` and internet; imported only when asked for."""
    try:
        import datasets
    except ImportError:
        raise SystemExit("error: --data hf:... needs the Hugging Face `datasets` package (pip install datasets)")
    name, _, config = spec.partition(":")
    out = {}
    for split in ("train", "validation"):
        try:
            stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
        except ValueError:
            continue
        chunks, size = [], 0
        for row in stream:
            data = row.get("text", "").encode()
            chunks.append(data)
            size += len(data)
            if size >= max_bytes:
                break
        out["val" if split == "validation" else "train"] = b"".join(chunks)[:max_bytes]
    if "train" not in out:
        raise SystemExit(f"error: dataset {name!r} has no train split with a text column")
    if "val" not in out:
        cut = len(out["train"]) * (100 - val_percent) // 100
        out["train"], out["val"] = out["train"][:cut], out["train"][cut:]
    return {k: torch.frombuffer(bytearray(v), dtype=torch.uint8) for k, v in out.items()}
