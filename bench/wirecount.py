"""Counting a process's TCP bytes from outside it: the kernel's own per-socket counters (`ss -tin`),
sampled while the process runs. Used to check the bytes a node says it sent against what really
crossed its sockets (TLS, yamux framing, DHT traffic included)."""
from __future__ import annotations

import re
import subprocess
import threading

_SOCKET = re.compile(r"^\S+\s+\S+\s+\S+\s+(\S+)\s+(\S+)\s+users:\(.*pid=(\d+),")
_COUNTERS = re.compile(r"bytes_acked:(\d+).*?bytes_received:(\d+)")


def find_pids(pattern: str) -> list[int]:
    """Pids whose command line contains `pattern` (e.g. a node's identity file)."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class SocketCounter:
    """Polls `ss -tinpH` every `period_s` for the sockets of the processes `pids()` returns; keeps the
    largest counters seen per socket, so sockets that close early still count."""

    def __init__(self, pids, period_s: float = 0.3):
        self.pids, self.period_s = pids, period_s
        self.seen: dict[tuple[str, str, int], tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period_s)

    def sample(self) -> None:
        pids = set(self.pids())
        if not pids:
            return
        lines = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True).stdout.splitlines()
        for head, detail in zip(lines[::2], lines[1::2]):
            m, c = _SOCKET.match(head), _COUNTERS.search(detail)
            if m and c and int(m.group(3)) in pids:
                key = (m.group(1), m.group(2), int(m.group(3)))
                old = self.seen.get(key, (0, 0))
                self.seen[key] = (max(old[0], int(c.group(1))), max(old[1], int(c.group(2))))

    @property
    def sent(self) -> int:
        return sum(s for s, _ in self.seen.values())

    @property
    def received(self) -> int:
        return sum(r for _, r in self.seen.values())
