"""User-space delay line: hold every IPv4 packet read from a TUN device for D ms, then write it back.

    python bench/delay_line.py --dev dl0 --delay-ms 50 [--pair SRC DST MS ...] [--parent PID]

netem is missing on these machines, so bench/netns.py's lab (``NetnsLab(rtt_ms=...)``) routes every
inter-node packet in its router namespace into the TUN device ``--dev`` (policy routing: whatever
arrives from a host port goes to the TUN; whatever comes back out of the TUN is routed to its
destination's port).  This process reads each packet, stamps it with a deadline (now + its delay) and
writes it back to the same device once the deadline has passed, so the kernel receives it again and
forwards it.  A round trip crosses the line twice: RTT = 2 x delay.

- Delay: ``--delay-ms`` for every packet; ``--pair SRC DST MS`` overrides it for packets from SRC to
  DST (IPv4 addresses), i.e. per direction.  Packets are held by deadline (never released early), so
  on a loaded machine the delay can only grow.
- Order: packets with the same delay leave in the order they came (one FIFO per delay value; a
  deadline is the read time plus a constant, so each FIFO is sorted).
- Bounded: at most ``--max-bytes`` / ``--max-packets`` held; beyond that new packets are dropped (tail
  drop, counted), like a full router queue.
- Lifetime: the lab starts it in its own session and kills its process group at teardown; with
  ``--parent PID`` it also exits by itself within half a second once PID is no longer its parent (the
  lab's process died without a teardown), so it cannot outlive the lab as an orphan.
- Reporting: prints ``ready`` once the device is attached; on SIGUSR1 prints one JSON line of counters
  (packets, bytes, drops, mean/max lateness past the deadline) to stdout.

Standard library only, so it runs as a plain script (``python path/to/delay_line.py``) inside any
namespace without the repo on the path.
"""
from __future__ import annotations

import argparse
import collections
import fcntl
import ipaddress
import json
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_PACKET = 65536


def open_tun(name: str) -> int:
    """Attach to (or create) TUN device ``name`` without packet info; a non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class DelayLine:
    """The queueing part, free of I/O: ``push`` packets as they are read, ``due`` the ones to write."""

    def __init__(self, delay_s: float, pairs: dict[tuple[bytes, bytes], float] | None = None,
                 max_bytes: int = 16 << 20, max_packets: int = 20000):
        self.delay_s = delay_s
        self.pairs = pairs or {}  # (src, dst) as 4 raw bytes each -> delay in s
        self.max_bytes, self.max_packets = max_bytes, max_packets
        self.fifos: dict[float, collections.deque] = {}  # delay -> deque of (deadline, packet)
        self.held_bytes = self.held_packets = 0
        self.stats = {"packets": 0, "bytes": 0, "dropped_full": 0, "dropped_not_ipv4": 0,
                      "max_held_packets": 0, "max_held_bytes": 0, "late_s_sum": 0.0, "late_s_max": 0.0}

    def delay_of(self, pkt: bytes) -> float | None:
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            return None
        return self.pairs.get((pkt[12:16], pkt[16:20]), self.delay_s) if self.pairs else self.delay_s

    def push(self, pkt: bytes, now: float) -> bool:
        delay = self.delay_of(pkt)
        if delay is None:
            self.stats["dropped_not_ipv4"] += 1
            return False
        if self.held_packets >= self.max_packets or self.held_bytes + len(pkt) > self.max_bytes:
            self.stats["dropped_full"] += 1
            return False
        fifo = self.fifos.get(delay)
        if fifo is None:
            fifo = self.fifos[delay] = collections.deque()
        fifo.append((now + delay, pkt))
        self.held_packets += 1
        self.held_bytes += len(pkt)
        self.stats["max_held_packets"] = max(self.stats["max_held_packets"], self.held_packets)
        self.stats["max_held_bytes"] = max(self.stats["max_held_bytes"], self.held_bytes)
        return True

    def next_deadline(self) -> float | None:
        heads = [f[0][0] for f in self.fifos.values() if f]
        return min(heads) if heads else None

    def due(self, now: float) -> list[bytes]:
        """Packets whose deadline has passed, oldest deadline first (FIFO within each delay)."""
        out = []
        for fifo in self.fifos.values():
            while fifo and fifo[0][0] <= now:
                deadline, pkt = fifo.popleft()
                out.append((deadline, pkt))
        if len(self.fifos) > 1:
            out.sort(key=lambda x: x[0])  # stable: FIFO order kept for equal deadlines
        for deadline, pkt in out:
            late = now - deadline
            self.stats["late_s_sum"] += late
            self.stats["late_s_max"] = max(self.stats["late_s_max"], late)
            self.stats["packets"] += 1
            self.stats["bytes"] += len(pkt)
            self.held_packets -= 1
            self.held_bytes -= len(pkt)
        return [pkt for _, pkt in out]

    def report(self) -> dict:
        s = dict(self.stats)
        late_sum, late_max = s.pop("late_s_sum"), s.pop("late_s_max")
        s["late_ms_mean"] = 1000 * late_sum / s["packets"] if s["packets"] else 0.0
        s["late_ms_max"] = 1000 * late_max
        s["held_packets"] = self.held_packets
        return s


def run(fd: int, line: DelayLine, parent: int | None, out=sys.stdout) -> None:
    report = []
    signal.signal(signal.SIGUSR1, lambda *_: report.append(1))
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    next_parent_check = 0.0
    print("ready", file=out, flush=True)
    while True:
        now = time.monotonic()
        if parent is not None and now >= next_parent_check:
            if os.getppid() != parent:
                return  # the lab's process is gone without a teardown: do not linger
            next_parent_check = now + 0.5
        if report:
            report.clear()
            print(json.dumps(line.report()), file=out, flush=True)
        deadline = line.next_deadline()
        wait_s = 0.5 if deadline is None else min(0.5, max(0.0, deadline - now))
        # poll takes whole ms: round up so that we never wake before the deadline and spin
        events = poller.poll(-(-wait_s * 1000 // 1)) if wait_s > 0 else poller.poll(0)
        now = time.monotonic()
        if events:
            for _ in range(512):  # bounded batch, so that due packets are not starved
                try:
                    pkt = os.read(fd, MAX_PACKET)
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                line.push(pkt, now)
        for pkt in line.due(time.monotonic()):
            try:
                os.write(fd, pkt)
            except OSError:  # e.g. the kernel's backlog is full: the packet is lost, as on a wire
                line.stats["dropped_full"] += 1


def parse_pairs(items: list[list[str]] | None) -> dict[tuple[bytes, bytes], float]:
    return {(ipaddress.IPv4Address(s).packed, ipaddress.IPv4Address(d).packed): float(ms) / 1000
            for s, d, ms in items or []}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dev", required=True, help="TUN device to attach to (created if missing)")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay of every packet")
    p.add_argument("--pair", nargs=3, action="append", metavar=("SRC", "DST", "MS"),
                   help="one-way delay of packets from SRC to DST (overrides --delay-ms)")
    p.add_argument("--max-bytes", type=int, default=16 << 20, help="bytes held at most (tail drop beyond)")
    p.add_argument("--max-packets", type=int, default=20000, help="packets held at most (tail drop beyond)")
    p.add_argument("--parent", type=int, default=None, help="exit once this pid is no longer our parent")
    args = p.parse_args(argv)
    if args.delay_ms < 0 or any(float(ms) < 0 for *_, ms in args.pair or []):
        p.error("delays must be >= 0")
    if args.parent is not None and os.getppid() != args.parent:
        return 1  # our parent died before we started
    fd = open_tun(args.dev)
    line = DelayLine(args.delay_ms / 1000, parse_pairs(args.pair), args.max_bytes, args.max_packets)
    try:
        run(fd, line, args.parent)
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
