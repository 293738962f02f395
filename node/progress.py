"""A run as its operator sees it: one status line that redraws itself on a terminal and prints plain
lines in logs, the run's curves, and the summary JSON every training command writes from them."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


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


class RunLog:
    """The curves of one run (train-local's, or one trainer's in a swarm): a loss, a duration and a
    staleness per update, and validation losses; `summary()` is the part of the run summary they give."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.losses, self.step_times, self.staleness, self.val_curve = [], [], [], []

    def add(self, loss: float, seconds: float, staleness: float = 0.0) -> None:
        self.losses.append(loss)
        self.step_times.append(seconds)
        self.staleness.append(staleness)

    def tokens_per_s(self, last: int | None = None) -> float:
        times = self.step_times[-last:] if last else self.step_times
        return self.tokens_per_step * len(times) / sum(times) if times and sum(times) else 0.0

    def summary(self) -> dict:
        losses, times = self.losses, self.step_times
        return {"steps_completed": len(losses), "train_loss_first": losses[0] if losses else None,
                "train_loss_last": losses[-1] if losses else None,
                "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                "tokens_per_s": self.tokens_per_s(), "step_time_s": sum(times) / len(times) if times else None,
                "loss_curve": losses, "val_curve": self.val_curve, "step_times": times, "staleness": self.staleness}


def write_summary(path: str | None, summary: dict) -> None:
    """The run summary JSON at `path` (nothing when None)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=1))
