"""Network-namespace lab: run swarm nodes on rate-limited links (needs root).

Topology: one "switch" namespace holding a Linux bridge, plus ``n_hosts``
namespaces, each joined to the bridge by a veth pair::

    host i: eth0 10.77.0.{i+1}/24  <--veth-->  p{i} -- br0 (switch namespace)

Nothing is created in the root namespace: both ends of every veth are created
directly inside the lab's namespaces, so the short fixed interface names
(eth0, p{i}, br0 -- well under Linux's 15-char limit) cannot clash with the
host's, no traffic can reach the host network, and deleting the namespaces
removes every link.

Shaping uses ``tbf`` (netem is not available here) on the egress of BOTH ends
of every veth, so each host's uplink and downlink are limited to
``rate_mbit`` independently.  The rate counts whole Ethernet frames, so TCP
goodput is ~1448/1514 = 95.6 % of it (MSS 1448 with timestamps).

Latency (``rtt_ms`` > 0; netem is missing here too): the switch namespace becomes a router
instead of a bridge, and a user-space delay line (bench/delay_line.py) sits in it::

    host i eth0 [tbf up] --> p{i} --(policy route: iif p{i} -> table 100)--> dl0 (TUN)
        delay line: read, hold rtt_ms / 2, write back to dl0
    dl0 --(main table: 10.77.0.{j+1}/32 dev p{j})--> p{j} [tbf down] --> host j eth0

Hosts keep their addresses and /24 on eth0; the router answers their ARP for each other (proxy ARP),
so every inter-host packet is forwarded through the TUN, once each way: RTT = 2 x one-way delay.
The TUN lies between the sender's uplink tbf and the receiver's downlink tbf, so both rate limits
hold exactly as without delay (the delay line shifts the arrival pattern by a constant; it does not
queue behind or in front of a shaper).  The delay line runs in its own session, tracked like
``popen``'s processes (killed at teardown); it also exits by itself if the lab's process dies
without one.  The TUN device is persistent, so if the delay line dies its packets are dropped
(traffic stops) rather than silently routed around the delay.  ``one_way_ms`` sets per-direction
delays between given host pairs.  ``rtt_ms=0`` (the default) builds the bridged lab above, unchanged.

Namespace names encode the owning pid (``rbm<pid>x<tag>-h0``, ``...-sw``) so
that ``cleanup_stale`` can remove leftovers of runs that were SIGKILLed.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import re
import select
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

PREFIX = "rbm"  # prefix family of every namespace we create
DELAY_LINE = Path(__file__).with_name("delay_line.py")  # run as a plain script (stdlib only)
DELAY_TABLE = "100"  # routing table (router namespace) that sends host ports' traffic into the TUN
_NAME_RE = re.compile(r"^(?P<prefix>[a-z]+)(?P<pid>\d+)x(?P<tag>[0-9a-f]+)-(?:sw|h\d+)$")


def _run(argv: Sequence[str], check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, timeout=timeout)


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]  # "name (id: 3)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_netns(ns: str) -> None:
    # Deleting a namespace does not kill the processes inside it (they would
    # even keep it alive), so SIGKILL whatever is still in there first.
    for pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _run(["ip", "netns", "delete", ns], check=False)


# Hosts run a loss-based TCP, as volunteers' machines do: CUBIC is Linux's, Windows' and macOS's
# default, and at these links' few-packet windows it runs in its Reno-friendly region; reno stands in
# because a namespace may only pick from the machine's allowed list (here "reno bbr"). The machine this
# lab was built on defaults to bbr: BBRv1 on a tbf measured bandwidths 10x the link and overshot its
# few-packet queue: 34-67% of what the scaling lab's nodes sent was dropped (16-35% with reno), and,
# before averaging was paced, connections closed mid-round when a write waited past libp2p's 10 s
# (bench.scaling --congestion bbr runs it). One flow alone gets the same goodput with either.
CONGESTION = "reno"


def tbf_burst_bytes(rate_mbit: float) -> int:
    """tbf bucket size: one 250 Hz tick of traffic (4 ms), at least 4 KiB.

    Measured (TCP goodput / rate, ideal 0.956): a bucket of one MTU loses up
    to 20 % at 1 and 1000 Mbit/s; 8-64 KiB loses ~1 % at 1000 Mbit/s, where
    4 ms (500 KB) is exact; at low rates big buckets (16-32 KiB) let each
    burst overrun the short queue, and the resulting losses cost 5-45 %.
    A small bucket also keeps the link faithful for intermittent messages,
    which would otherwise pass their first ``burst`` bytes at line rate.
    """
    return max(4096, int(rate_mbit * 1e6 / 8 * 0.004))


@dataclass(frozen=True)
class Host:
    name: str  # netns name
    ip: str  # IPv4 address, no prefix length


class NetnsLab:
    """Context manager: ``n_hosts`` namespaces on one bridge, optionally shaped.

    ``latency_ms`` sizes each tbf queue (max queueing delay). 50 ms gave
    accurate TCP rates from 1 to 1000 Mbit/s (measured with bbr hosts, where
    200 ms lost 15-20 % below 10 Mbit/s); at 0.5 Mbit/s one flow gets
    0.476 Mbit/s with reno at 50, 200 and 500 ms alike.

    ``rtt_ms`` > 0 adds that round-trip time to every path between two hosts (a delay line in the
    router namespace, rtt_ms / 2 each way); ``one_way_ms`` {(i, j): ms} overrides the delay of
    packets from host i to host j (per direction).  See the module docstring.

    >>> with NetnsLab(2, rate_mbit=10, rtt_ms=100) as lab:
    ...     srv = lab.popen(1, ["python3", "-m", "http.server", "--bind", lab.hosts[1].ip])
    """

    def __init__(self, n_hosts: int, rate_mbit: float | None = None, prefix: str | None = None,
                 subnet: str = "10.77.0.0/24", latency_ms: float = 50.0, grace_s: float = 3.0,
                 rtt_ms: float = 0.0, one_way_ms: dict[tuple[int, int], float] | None = None,
                 count_peers: bool = False, congestion: str | None = CONGESTION):
        self.congestion = congestion  # every host's TCP congestion control (None: the machine's default)
        self.count_peers = count_peers  # per-peer byte counters (iptables) in every host: peer_bytes()
        self.prefix = prefix or PREFIX
        if not re.fullmatch(r"[a-z]{1,8}", self.prefix):
            raise ValueError("prefix must be 1-8 lowercase letters (cleanup_stale parses names)")
        self.net = ipaddress.ip_network(subnet)
        if not 1 <= n_hosts <= self.net.num_addresses - 2:
            raise ValueError(f"need 1 <= n_hosts <= {self.net.num_addresses - 2} for {subnet}")
        self.rate_mbit = rate_mbit
        self.latency_ms = latency_ms
        if rtt_ms < 0 or any(ms < 0 for ms in (one_way_ms or {}).values()):
            raise ValueError("delays must be >= 0")
        if any(not (0 <= i < n_hosts and 0 <= j < n_hosts) for i, j in (one_way_ms or {})):
            raise ValueError("one_way_ms keys must be pairs of host indices")
        self.rtt_ms = rtt_ms
        self.one_way_ms = dict(one_way_ms or {})
        self.routed = rtt_ms > 0 or bool(self.one_way_ms)  # router + delay line instead of a bridge
        self.delay_line: subprocess.Popen | None = None
        self._line_buf = b""  # the delay line's stdout not yet returned by _read_line
        self.grace_s = grace_s  # SIGTERM -> SIGKILL delay for tracked processes
        base = f"{self.prefix}{os.getpid()}x{secrets.token_hex(2)}"  # unique per lab
        self.switch = f"{base}-sw"
        self.hosts = [Host(f"{base}-h{i}", str(self.net.network_address + i + 1)) for i in range(n_hosts)]
        self._created: list[str] = []  # namespaces actually created
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.RLock()
        self._state = "open"  # -> "closing" -> "closed"
        self._pending_signal: int | None = None
        self._old_handlers: dict[int, object] = {}
        self._owner_pid = os.getpid()  # a forked child must not tear down our lab

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

    def _ip(self, ns: str, *argv: str) -> None:
        _run(["ip", "-n", ns, *argv])

    def _add_netns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._created.append(ns)
        self._ip(ns, "link", "set", "lo", "up")

    def _sysctl(self, ns: str, *settings: str) -> None:
        _run(["ip", "netns", "exec", ns, "sysctl", "-qw", *settings])

    def _build(self) -> None:
        sw = self.switch
        self._add_netns(sw)
        if self.routed:
            # a router: forwards, answers ARP for the other hosts, no redirects (hosts must keep
            # sending to it), no reverse-path filter (packets come back out of the TUN)
            self._sysctl(sw, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                         "net.ipv4.conf.default.rp_filter=0", "net.ipv4.conf.all.send_redirects=0",
                         "net.ipv4.conf.default.send_redirects=0", "net.ipv4.conf.default.proxy_arp=1")
        else:
            self._ip(sw, "link", "add", "br0", "type", "bridge")
            self._ip(sw, "link", "set", "br0", "up")
        for i, h in enumerate(self.hosts):
            self._add_netns(h.name)
            self._ip(sw, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", h.name)
            if self.routed:
                self._sysctl(sw, f"net.ipv4.neigh.p{i}.proxy_delay=0")  # default: answer after up to 0.8 s
                self._ip(sw, "link", "set", f"p{i}", "up")
                self._ip(sw, "route", "add", f"{h.ip}/32", "dev", f"p{i}")
                self._ip(sw, "rule", "add", "iif", f"p{i}", "lookup", DELAY_TABLE, "pref", "100")
            else:
                self._ip(sw, "link", "set", f"p{i}", "master", "br0", "up")
            if self.congestion:
                self._sysctl(h.name, f"net.ipv4.tcp_congestion_control={self.congestion}")
            self._ip(h.name, "addr", "add", f"{h.ip}/{self.net.prefixlen}", "dev", "eth0")
            self._ip(h.name, "link", "set", "eth0", "up")
            if self.rate_mbit is not None:
                self._shape(h.name, "eth0")  # host -> switch (uplink)
                self._shape(sw, f"p{i}")  # switch -> host (downlink)
        if self.count_peers:
            for h in self.hosts:
                for other in self.hosts:
                    if other is not h:  # rules without a target only count
                        _run(["ip", "netns", "exec", h.name, "iptables", "-A", "INPUT", "-s", other.ip])
                        _run(["ip", "netns", "exec", h.name, "iptables", "-A", "OUTPUT", "-d", other.ip])
        if self.routed:
            self._start_delay_line()

    def _start_delay_line(self, timeout: float = 15.0) -> None:
        """The TUN (persistent: without its reader, packets are dropped rather than routed around
        it), the route into it, then the delay line in its own session; returns once it is attached."""
        sw = self.switch
        self._ip(sw, "tuntap", "add", "dev", "dl0", "mode", "tun")
        self._ip(sw, "link", "set", "dl0", "up", "txqueuelen", "10000")
        self._ip(sw, "route", "add", "default", "dev", "dl0", "table", DELAY_TABLE)
        argv = [sys.executable, str(DELAY_LINE), "--dev", "dl0", "--delay-ms", f"{self.rtt_ms / 2:g}",
                "--parent", str(os.getpid())]
        for (i, j), ms in sorted(self.one_way_ms.items()):
            argv += ["--pair", self.hosts[i].ip, self.hosts[j].ip, f"{ms:g}"]
        with self._lock:
            if self._state != "open":
                raise RuntimeError("lab is closed")
            self.delay_line = subprocess.Popen(["ip", "netns", "exec", sw, *argv], start_new_session=True,
                                               stdout=subprocess.PIPE, bufsize=0)
            self._procs.append(self.delay_line)
        if self._read_line(timeout) != "ready":
            raise RuntimeError(f"delay line did not start (exit status {self.delay_line.poll()})")

    def _read_line(self, timeout: float) -> str | None:
        """The delay line's next stdout line, or None after ``timeout`` s or at EOF."""
        fd, deadline = self.delay_line.stdout.fileno(), time.monotonic() + timeout
        while b"\n" not in self._line_buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._line_buf += chunk
        line, self._line_buf = self._line_buf.split(b"\n", 1)
        return line.decode().strip()

    def delay_line_stats(self, timeout: float = 3.0) -> dict:
        """The delay line's counters (packets and bytes passed, drops, lateness past the deadline,
        most packets/bytes held) and its CPU time so far (``cpu_s``: user + system)."""
        if self.delay_line is None or self.delay_line.poll() is not None:
            raise RuntimeError("no delay line running")
        self.delay_line.send_signal(signal.SIGUSR1)
        line = self._read_line(timeout)
        if line is None:
            raise RuntimeError("delay line did not report")
        stats = json.loads(line)
        fields = Path(f"/proc/{self.delay_line.pid}/stat").read_text().rsplit(")", 1)[1].split()
        stats["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        return stats

    def _shape(self, ns: str, dev: str) -> None:
        _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
              "rate", f"{self.rate_mbit}mbit", "burst", str(tbf_burst_bytes(self.rate_mbit)),
              "latency", f"{self.latency_ms}ms"])

    # ------------------------------------------------------------- processes
    def exec_argv(self, i: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[i].name, *argv]

    def popen(self, i: int, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start ``argv`` in host ``i``'s namespace in a new session, so that
        cleanup can kill it and its children by process group without
        touching ours.  (``ip netns exec`` execs, so the pid is argv's.)"""
        with self._lock:
            if self._state != "open":
                raise RuntimeError("lab is closed")
            p = subprocess.Popen(self.exec_argv(i, argv), start_new_session=True, **kw)
            self._procs.append(p)
            return p

    def _kill_procs(self) -> None:
        # Only signal groups whose leader we have not reaped: an unreaped
        # leader keeps its pid (= pgid) reserved, so we cannot hit a stranger.
        # Members of already-reaped groups are caught by _delete_netns.
        live = [p for p in self._procs if p.returncode is None]
        for sig, grace in ((signal.SIGTERM, self.grace_s), (signal.SIGKILL, 5.0)):
            for p in live:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace
            for p in live:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            live = [p for p in live if p.returncode is None]
            if not live:
                break

    def link_bytes(self, i: int) -> int:
        """Bytes host ``i``'s link carried so far, both ways: eth0's tx + rx counters inside its
        namespace (``ip netns exec`` mounts that namespace's /sys), i.e. every frame it shaped."""
        stats = "/sys/class/net/eth0/statistics"
        out = _run(self.exec_argv(i, ["cat", f"{stats}/tx_bytes", f"{stats}/rx_bytes"])).stdout.split()
        return sum(int(v) for v in out)

    def peer_bytes(self, i: int) -> dict[int, dict[str, int]]:
        """Bytes (IP packets) host ``i`` sent to and received from each other host so far, from the
        iptables counters ``count_peers`` installed in its namespace. Sent bytes are counted before
        its uplink's tbf, so they include packets the tbf dropped (and TCP sent again)."""
        if not self.count_peers:
            raise RuntimeError("the lab was built without count_peers")
        index = {h.ip: j for j, h in enumerate(self.hosts)}
        out = {j: {"sent": 0, "received": 0} for j in range(len(self.hosts)) if j != i}
        for chain, col, key in (("INPUT", 6, "received"), ("OUTPUT", 7, "sent")):  # rules have no target
            for line in _run(self.exec_argv(i, ["iptables", "-nvxL", chain])).stdout.splitlines()[2:]:
                f = line.split()
                if len(f) > col and f[col] in index:
                    out[index[f[col]]][key] += int(f[1])
        return out

    # --------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        """Kill tracked processes, delete every namespace we created.

        Idempotent; called by __exit__, our SIGTERM/SIGINT handlers and atexit."""
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            if self._state != "open":
                return
            self._state = "closing"
            try:
                self._kill_procs()
            finally:
                if self.delay_line is not None and self.delay_line.stdout is not None:
                    self.delay_line.stdout.close()
                for ns in reversed(self._created):
                    _delete_netns(ns)
                self._created.clear()
                atexit.unregister(self.cleanup)
                self._restore_signal_handlers()
                self._state = "closed"
        if self._pending_signal is not None:  # arrived mid-cleanup: deliver it now
            signal.raise_signal(self._pending_signal)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal() only works in the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored stays ignored
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
            self._old_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        old = self._old_handlers.get(signum, signal.SIG_DFL)
        if os.getpid() == self._owner_pid:
            if self._state == "closing":  # interrupted our own cleanup: finish it first
                self._pending_signal = signum
                return
            self.cleanup()  # also restores the previous handlers
        # then do what the previous handler would have done
        if callable(old):
            old(signum, frame)  # e.g. default_int_handler -> KeyboardInterrupt
        elif old == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)


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
    """None if we can build a shaped lab here; else the reason why not."""
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
        detail = getattr(e, "stderr", None) or str(e)
        return f"cannot build a netns lab: {detail.strip()}"
    return None


def require_tun() -> str | None:
    """None if a lab with latency (``rtt_ms`` > 0) can be built, given ``require_root_netns()``; else why not."""
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as e:
        return f"no usable /dev/net/tun for the delay line: {e}"
    return None


# ------------------------------------------------------------------ throughput
# The receiver drives the measurement: it counts bytes for a fixed window from
# the first byte, then exits, which stops the sender.  (Letting the sender stop
# on its own makes the run last until its multi-MB socket buffer drains
# through the shaper: ~7 s instead of 2 s at 1 Mbit/s.)  No warm-up is
# discarded: that made low rates *less* accurate, because data parked in TCP's
# out-of-order queue after an early loss reaches the application later, in
# one go, inside the window.
_SINK = r"""
import json, socket, sys, time
host, port, seconds, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen(1); srv.settimeout(timeout)
print("ready", flush=True)
conn, _ = srv.accept(); conn.settimeout(timeout)
conn.recv(1 << 16)  # the first chunk starts the clock and is not counted
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
        s.sendall(buf)  # until the sink goes away (EPIPE/RST) or the timeout hits
except OSError:
    pass
"""


def measure_throughput_mbit(lab: NetnsLab, src: int, dst: int, seconds: float = 2.0, port: int = 5201) -> float:
    """TCP goodput from host ``src`` to host ``dst`` in Mbit/s, measured at the
    receiver over ``seconds``.  Takes ~seconds; fails after seconds + 15 s."""
    ip = lab.hosts[dst].ip
    limit = seconds + 15.0  # socket timeouts in both scripts
    sink = lab.popen(dst, [sys.executable, "-c", _SINK, ip, str(port), str(seconds), str(limit)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sender = None
    try:
        if sink.stdout.readline().strip() != "ready":  # listening before we connect
            raise RuntimeError(f"sink failed: {sink.stderr.read()}")
        sender = lab.popen(src, [sys.executable, "-c", _SENDER, ip, str(port), str(limit)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = sink.stdout.read()  # EOF when the sink exits; bounded by its timeouts
        if sink.wait(timeout=5) != 0:
            raise RuntimeError(f"sink failed: {sink.stderr.read()}")
        sender.wait(timeout=5)
        res = json.loads(out)
        return res["bytes"] * 8 / res["seconds"] / 1e6
    finally:
        _reap(sink, sender)


def _reap(*procs) -> None:
    """Kill what is still running of these helper processes (their own groups) and close their pipes."""
    for p in procs:
        if p is not None:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()


# ------------------------------------------------------------------ round trips
_ECHO = r"""
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen(1); srv.settimeout(timeout)
print("ready", flush=True)
conn, _ = srv.accept(); conn.settimeout(timeout)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while b := conn.recv(64):
    conn.sendall(b)
"""

_PINGER = r"""
import json, socket, sys, time
host, port, n, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
t0 = time.monotonic()
s = socket.create_connection((host, port), timeout=timeout)
connect = time.monotonic() - t0
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(n):
    t0 = time.monotonic()
    s.sendall(b"x")
    if s.recv(64) != b"x":
        raise SystemExit("bad echo")
    rtts.append(time.monotonic() - t0)
print(json.dumps({"connect_ms": 1000 * connect, "rtt_ms": [1000 * r for r in rtts]}), flush=True)
"""


def measure_rtt_ms(lab: NetnsLab, src: int, dst: int, n: int = 10, port: int = 5202, timeout: float = 15.0) -> dict:
    """TCP round trips from host ``src`` to host ``dst`` (an echo with TCP_NODELAY, one byte at a time):
    ``{"connect_ms": the handshake, "rtt_ms": [n echo round trips]}``."""
    ip = lab.hosts[dst].ip
    echo = lab.popen(dst, [sys.executable, "-c", _ECHO, ip, str(port), str(timeout)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pinger = None
    try:
        if echo.stdout.readline().strip() != "ready":
            raise RuntimeError(f"echo server failed: {echo.stderr.read()}")
        pinger = lab.popen(src, [sys.executable, "-c", _PINGER, ip, str(port), str(n), str(timeout)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = pinger.communicate(timeout=timeout + n * 2)
        if pinger.returncode != 0:
            raise RuntimeError(f"pinger failed: {err}")
        return json.loads(out)
    finally:
        _reap(echo, pinger)


def prepare() -> str | None:
    """None when a lab can be built (after removing leftovers of dead runs), else why not."""
    reason = require_root_netns()
    if reason is None:
        cleanup_stale()
    return reason
