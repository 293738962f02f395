"""Atomic checkpoints: a crash mid-write never destroys the previous good checkpoint."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`: readers see the
    old or the new checkpoint, never half of one."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(buf.getvalue(), path)


def load(path: str | os.PathLike, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so instead of a pickle traceback
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from e


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Like atomic_save, for an already serialized checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
