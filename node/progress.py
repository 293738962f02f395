"""One status line that redraws itself on a terminal and prints plain lines in logs."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, stream=sys.stderr, every_s: float = 2.0):
        self.total, self.stream, self.every_s = total, stream, every_s
        self.tty = stream.isatty()
        self._last = 0.0

    def update(self, step: int, fields: dict, force: bool = False) -> None:
        now = time.monotonic()
        if not (self.tty or force or now - self._last >= self.every_s or step >= self.total):
            return
        self._last = now
        width = 24
        done = int(width * min(step, self.total) / max(1, self.total))
        bar = "#" * done + "." * (width - done)
        text = f"[{bar}] {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items())
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{n:.0f}B"
        n /= 1024
    return f"{n:.1f}GB"
