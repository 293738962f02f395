"""Network-namespace lab: run swarm nodes on rate-limited links (root only).

Topology: one "switch" namespace holding a Linux bridge, plus ``n_hosts``
namespaces, each joined to the bridge by a veth pair::

    host_i [eth0 10.77.0.{i+1}] <--veth--> [p{i}] br0 (switch ns)

Nothing is created in the root namespace: every link is created directly
inside the lab's namespaces, so deleting the namespaces removes everything and
no traffic can reach the host network.  Shaping uses ``tbf`` (netem is not
available here) on the egress of BOTH ends of every veth, so each host's
uplink and downlink are limited to ``rate_mbit`` independently.

Namespace names encode the owning pid (``rbm<pid>x<tag>-h0``) so that
``cleanup_stale`` can remove leftovers of crashed runs.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

PREFIX = "rbm"  # prefix family of every namespace we create
_NAME_RE = re.compile(r"^(?P<prefix>[a-z]+)(?P<pid>\d+)x(?P<tag>[0-9a-f]+)-(?:sw|h\d+)$")


def _run(argv: list[str], check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    # lines look like "name" or "name (id: 3)"
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_pids(ns: str) -> None:
    """SIGKILL every process still inside ``ns``: deleting a namespace does not
    kill its processes, and they would keep the namespace alive."""
    out = _run(["ip", "netns", "pids", ns], check=False).stdout
    for pid in out.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete_netns(ns: str) -> None:
    _kill_netns_pids(ns)
    _run(["ip", "netns", "delete", ns], check=False)


def tbf_burst_bytes(rate_mbit: float) -> int:
    """Bucket size for tbf.

    Must hold at least one timer tick worth of tokens (rate/HZ, HZ=250 here)
    and comfortably more than one MTU frame, otherwise the achieved rate falls
    short; too large a bucket lets bursts through at line rate.  ~4 ms of
    traffic with a 32 KiB floor measured within a few % of the target from
    1 to 1000 Mbit/s.
    """
    return max(32 * 1024, int(rate_mbit * 1e6 / 8 * 0.004))


@dataclass(frozen=True)
class Host:
    name: str  # netns name
    ip: str  # address without prefix length


class NetnsLab:
    """Context manager creating ``n_hosts`` namespaces behind a (shaped) bridge.

    >>> with NetnsLab(2, rate_mbit=10) as lab:
    ...     p = lab.popen(0, ["python", "-m", "http.server", "--bind", lab.hosts[0].ip])
    """

    def __init__(self, n_hosts: int, rate_mbit: float | None = None, prefix: str | None = None,
                 subnet: str = "10.77.0.0/24", latency_ms: float = 200.0, grace_s: float = 3.0):
        if n_hosts < 1:
            raise ValueError("n_hosts must be >= 1")
        self.prefix = prefix or PREFIX
        if not re.fullmatch(r"[a-z]+", self.prefix):
            raise ValueError("prefix must be lowercase letters (it is parsed back by cleanup_stale)")
        self.n_hosts = n_hosts
        self.rate_mbit = rate_mbit
        self.latency_ms = latency_ms  # tbf queue length expressed as max queueing delay
        self.grace_s = grace_s
        self.net = ipaddress.ip_network(subnet)
        if n_hosts > self.net.num_addresses - 2:
            raise ValueError(f"subnet {subnet} too small for {n_hosts} hosts")
        base = f"{self.prefix}{os.getpid()}x{secrets.token_hex(2)}"
        self.switch = f"{base}-sw"
        self.hosts = [Host(f"{base}-h{i}", str(self.net.network_address + i + 1)) for i in range(n_hosts)]
        self._created: list[str] = []  # namespaces actually created, deleted on cleanup
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.RLock()
        self._closed = False
        self._old_handlers: dict[int, object] = {}

    # ------------------------------------------------------------------ setup
    def __enter__(self) -> "NetnsLab":
        atexit.register(self.cleanup)  # last resort if neither __exit__ nor a signal runs
        self._install_signal_handlers()
        try:
            self._build()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def _ns(self, ns: str, *argv: str) -> None:
        _run(["ip", "-n", ns, *argv])

    def _add_netns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._created.append(ns)
        self._ns(ns, "link", "set", "lo", "up")

    def _build(self) -> None:
        sw = self.switch
        self._add_netns(sw)
        self._ns(sw, "link", "add", "br0", "type", "bridge")
        self._ns(sw, "link", "set", "br0", "up")
        plen = self.net.prefixlen
        for i, h in enumerate(self.hosts):
            self._add_netns(h.name)
            # Both ends are created directly in their namespaces (never in the
            # root ns), so short fixed names cannot collide with host links.
            self._ns(sw, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", h.name)
            self._ns(sw, "link", "set", f"p{i}", "master", "br0")
            self._ns(sw, "link", "set", f"p{i}", "up")
            self._ns(h.name, "addr", "add", f"{h.ip}/{plen}", "dev", "eth0")
            self._ns(h.name, "link", "set", "eth0", "up")
            if self.rate_mbit is not None:
                self._shape(h.name, "eth0")  # host -> switch (uplink)
                self._shape(sw, f"p{i}")  # switch -> host (downlink)

    def _shape(self, ns: str, dev: str) -> None:
        _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
                 "rate", f"{self.rate_mbit}mbit",
                 "burst", str(tbf_burst_bytes(self.rate_mbit)),
                 "latency", f"{self.latency_ms}ms"])

    # ------------------------------------------------------------- processes
    def exec_argv(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[i].name, *argv]

    def popen(self, i: int, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` in host ``i``'s namespace, in its own process group
        (so cleanup can kill it and its children without touching ours)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("lab is closed")
            p = subprocess.Popen(self.exec_argv(i, argv), start_new_session=True, **kw)
            self._procs.append(p)
            return p

    def _kill_procs(self) -> None:
        # Only signal groups whose leader we have not reaped yet: an unreaped
        # leader keeps its pid (= pgid) reserved, so we cannot hit a stranger.
        live = [p for p in self._procs if p.returncode is None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in live:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + (self.grace_s if sig == signal.SIGTERM else 5.0)
            for p in live:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            live = [p for p in live if p.returncode is None]
            if not live:
                break

    # --------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        """Kill tracked processes, delete every namespace we created. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._kill_procs()
            finally:
                for ns in reversed(self._created):
                    _delete_netns(ns)  # also SIGKILLs stragglers that left our groups
                self._created.clear()
                self._restore_signal_handlers()
                atexit.unregister(self.cleanup)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works in the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        old = self._old_handlers.get(signum, signal.SIG_DFL)
        self.cleanup()  # also restores the previous handlers
        # then behave as the previous handler would have
        if callable(old):
            old(signum, frame)  # e.g. default_int_handler -> KeyboardInterrupt
        elif old == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces of our family whose owning pid is dead; return their names."""
    removed = []
    for ns in _netns_list():
        m = _NAME_RE.match(ns)
        if m and m["prefix"] == prefix and not _pid_alive(int(m["pid"])):
            _delete_netns(ns)
            removed.append(ns)
    return removed


def require_root_netns() -> str | None:
    """None if we can create namespaces, veths and tbf qdiscs; else why not."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) not found"
    if os.geteuid() != 0:
        return "need root to create network namespaces"
    try:
        with NetnsLab(1, rate_mbit=10):
            pass
    except (subprocess.SubprocessError, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return f"cannot build a netns lab: {detail.strip()}"
    return None


# ------------------------------------------------------------------ throughput
# The receiver drives the measurement: it counts bytes for a fixed window and
# then closes, which stops the sender.  (Letting the sender stop on its own
# makes the run last until its multi-MB socket buffer drains through the
# shaper: ~7 s instead of 2 s at 1 Mbit/s.)  The window starts at the first
# byte and is not trimmed: discarding a "warm-up" prefix made low rates less
# accurate, because data held in TCP's out-of-order queue after an early loss
# is handed to the application later, inside the window, in one go.
_SINK = r"""
import json, socket, sys, time
host, port, seconds, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen(1); srv.settimeout(timeout)
print("ready", flush=True)
conn, _ = srv.accept(); conn.settimeout(timeout)
conn.recv(1 << 16)  # first chunk starts the clock and is not counted
t0 = time.monotonic()
n = 0
while True:
    b = conn.recv(1 << 16)
    now = time.monotonic()
    if not b or now >= t0 + seconds:
        break
    n += len(b)
print(json.dumps({"bytes": n, "seconds": now - t0}), flush=True)
"""

_SENDER = r"""
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, port), timeout=timeout)
buf = b"\0" * (1 << 16)
try:
    while True:
        s.sendall(buf)  # until the sink closes (EPIPE/RST) or the timeout hits
except OSError:
    pass
"""


def measure_throughput_mbit(lab: NetnsLab, src: int, dst: int, seconds: float = 2.0, port: int = 5201) -> float:
    """TCP goodput from host ``src`` to host ``dst`` in Mbit/s (receiver side)."""
    ip = lab.hosts[dst].ip
    limit = seconds + 15.0  # hard bound on the whole measurement
    sink = lab.popen(dst, [sys.executable, "-c", _SINK, ip, str(port), str(seconds), str(limit)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sender = None
    try:
        if sink.stdout.readline().strip() != "ready":  # listening before we connect
            raise RuntimeError(f"sink failed: {sink.stderr.read()}")
        sender = lab.popen(src, [sys.executable, "-c", _SENDER, ip, str(port), str(limit)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        out = sink.stdout.read()  # EOF when the sink exits; bounded by its own timeouts
        if sink.wait(timeout=5) != 0:
            raise RuntimeError(f"sink failed: {sink.stderr.read()}")
        sender.wait(timeout=5)
        res = json.loads(out)
        if not res["seconds"]:
            raise RuntimeError(f"no data received: {res}")
        return res["bytes"] * 8 / res["seconds"] / 1e6
    finally:
        for p in (sink, sender):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
