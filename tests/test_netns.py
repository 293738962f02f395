"""NetnsLab: shaped links are accurate, the delay line adds its RTT, and nothing outlives the lab."""

import signal
import subprocess
import sys
import textwrap
import time
from ipaddress import ip_address
from pathlib import Path

import pytest

from bench.delay_line import DelayLine, parse_pairs
from bench.netns import NetnsLab, cleanup_stale, measure_rtt_ms, measure_throughput_mbit, require_root_netns, require_tun

REASON = require_root_netns()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"netns unavailable: {REASON}")
REPO = Path(__file__).resolve().parents[1]


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def alive(pid: int) -> bool:
    """True unless gone or a zombie (an orphan may wait a moment for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def lab_names(lab: NetnsLab) -> set[str]:
    return {lab.switch, *(h.name for h in lab.hosts)}


def test_shaped_rate_is_accurate():
    with NetnsLab(2, rate_mbit=10) as lab:
        got = measure_throughput_mbit(lab, 0, 1, seconds=2.0)
    assert got == pytest.approx(10, rel=0.2), got


def test_hosts_run_the_labs_congestion_control_not_the_machines():
    def congestion(lab):
        return [subprocess.run(["ip", "netns", "exec", h.name, "sysctl", "-n", "net.ipv4.tcp_congestion_control"],
                               capture_output=True, text=True, check=True).stdout.strip() for h in lab.hosts]

    with NetnsLab(2, congestion="reno") as lab:
        assert congestion(lab) == ["reno", "reno"]
    machines = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()  # here: bbr
    with NetnsLab(1, congestion=machines) as lab:
        assert congestion(lab) == [machines]


def test_link_bytes_count_the_traffic_of_each_host():
    with NetnsLab(3, rate_mbit=10, count_peers=True) as lab:
        before = [lab.link_bytes(i) for i in range(3)]
        got = measure_throughput_mbit(lab, 0, 1, seconds=1.0)
        moved = [lab.link_bytes(i) - b for i, b in zip(range(3), before)]
        peers = [lab.peer_bytes(i) for i in range(3)]
    payload = got * 1e6 / 8 * 1.0  # at least what the sink counted, on both ends' links
    assert moved[0] >= payload and moved[1] >= payload, (moved, payload)
    assert moved[2] < 0.01 * payload  # a bystander's link saw next to nothing (a bridge floods only unknowns)
    # per peer: what host 1 received from host 0 crossed both tbfs; host 0 counts what it sent before its
    # own tbf (drops included), so about as much: a tbf cuts a GSO packet counted once at the sender into
    # segments with headers of their own (52 of 1500 B, 3.5%; seen with reno: 0.4% more received than sent);
    # the bystander exchanged nothing with either
    assert payload <= peers[1][0]["received"] <= 1.035 * peers[0][1]["sent"], peers
    assert peers[2][0] == peers[2][1] == {"sent": 0, "received": 0} and peers[0][2]["sent"] == 0, peers


def test_cleanup_removes_namespaces_and_processes():
    with NetnsLab(2, rate_mbit=10) as lab:
        names = lab_names(lab)
        assert names <= netns_names()
        # a process that ignores SIGTERM (-> SIGKILL path) and has a child in its group
        p = lab.popen(1, ["sh", "-c", "trap '' TERM; sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        child = int(p.stdout.readline())
        lab.grace_s = 0.5
        assert alive(p.pid) and alive(child)
    assert not names & netns_names()
    deadline = time.monotonic() + 2
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(p.pid) and not alive(child)
    lab.cleanup()  # idempotent


def test_unshaped_is_much_faster():
    with NetnsLab(2) as lab:
        got = measure_throughput_mbit(lab, 0, 1, seconds=1.0)
    assert got > 50, got


def test_cleanup_on_exception():
    # what they were before, not the defaults: a run started as a background job has SIGINT ignored
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(RuntimeError, match="boom"):
        with NetnsLab(2, rate_mbit=1) as lab:
            names = lab_names(lab)
            p = lab.popen(0, ["sleep", "60"])
            raise RuntimeError("boom")
    assert not names & netns_names()
    assert p.returncode is not None
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers restored


def test_cleanup_on_sigterm():
    script = textwrap.dedent("""
        import time
        from bench.netns import NetnsLab
        with NetnsLab(2, rate_mbit=10) as lab:
            p = lab.popen(0, ["sleep", "60"])
            print(lab.switch, *(h.name for h in lab.hosts), p.pid, flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    *names, pid = proc.stdout.readline().split()
    assert set(names) <= netns_names()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM  # cleaned up, then died of the signal
    assert not set(names) & netns_names()
    assert not alive(int(pid))


def test_cleanup_stale_removes_dead_owner():
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is now free; our own labs (live pid) must survive
    stale = f"rbm{dead.pid}x0bad-h0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    with NetnsLab(1) as lab:
        removed = cleanup_stale()
        assert stale in removed and lab.hosts[0].name not in removed
        assert lab.hosts[0].name in netns_names()
    assert stale not in netns_names()


TUN_REASON = require_tun()
needs_tun = pytest.mark.skipif(TUN_REASON is not None, reason=f"delay line unavailable: {TUN_REASON}")


@needs_tun
def test_rtt_of_the_delay_line_and_none_without_it():
    # the delay line holds packets by deadline: a round trip never takes less than rtt_ms, and on a
    # loaded machine it can only take longer (hence the best of 10 for the +-15 ms check)
    with NetnsLab(2) as lab:
        flat = measure_rtt_ms(lab, 0, 1)["rtt_ms"]
    assert sorted(flat)[len(flat) // 2] < 5, flat
    with NetnsLab(2, rate_mbit=10, rtt_ms=100) as lab:
        got = measure_rtt_ms(lab, 0, 1)
        pid = lab.delay_line.pid
        assert lab.delay_line_stats()["packets"] >= 2 * 10
    rtts = got["rtt_ms"]
    assert min(rtts) >= 99.5, rtts  # 2 x 50 ms, less the clocks' rounding
    assert min(rtts) <= 115 and sorted(rtts)[len(rtts) // 2] <= 150, rtts
    assert got["connect_ms"] >= 99.5, got  # the handshake (and the ARP before it) crosses it too
    assert not alive(pid)  # torn down with the lab


@needs_tun
def test_rate_holds_through_the_delay_line():
    # the TUN sits between the sender's uplink tbf and the receiver's downlink tbf: 100 ms of RTT
    # must neither bypass the shaping nor (with TCP's default windows) cost much of the rate
    with NetnsLab(2, rate_mbit=1, rtt_ms=100) as lab:
        got = measure_throughput_mbit(lab, 0, 1, seconds=3.0)
        stats = lab.delay_line_stats()
    assert got == pytest.approx(1 * 1448 / 1514, rel=0.15), got
    assert stats["dropped_full"] == 0 and stats["bytes"] >= got * 1e6 / 8 * 3.0, stats


@needs_tun
def test_delay_line_exits_when_the_lab_process_is_killed():
    script = textwrap.dedent("""
        import time
        from bench.netns import NetnsLab
        with NetnsLab(2, rtt_ms=20) as lab:
            print(lab.delay_line.pid, flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    proc.kill()  # no teardown at all
    proc.wait()
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    cleanup_stale()  # the namespaces of the dead owner


def test_delay_line_queue_keeps_order_per_delay_and_is_bounded():
    def pkt(src: str, dst: str, tag: int) -> bytes:  # a bare IPv4 header is all the line reads
        return bytes([0x45]) + bytes(11) + ip_address(src).packed + ip_address(dst).packed + bytes([tag])
    line = DelayLine(0.05, parse_pairs([["10.0.0.1", "10.0.0.2", "10"]]), max_packets=4)
    assert line.push(pkt("10.0.0.2", "10.0.0.1", 0), 0.0) and line.push(pkt("10.0.0.2", "10.0.0.1", 1), 0.0)
    assert line.push(pkt("10.0.0.1", "10.0.0.2", 2), 0.001)  # 10 ms this way
    assert not line.push(b"\x60" + bytes(40), 0.0)  # not IPv4
    assert line.push(pkt("10.0.0.2", "10.0.0.1", 3), 0.002)
    assert not line.push(pkt("10.0.0.2", "10.0.0.1", 4), 0.002)  # full: tail drop
    assert line.due(0.0109) == [] and line.next_deadline() == pytest.approx(0.011)
    assert [p[-1] for p in line.due(0.0111)] == [2]
    assert [p[-1] for p in line.due(0.0505)] == [0, 1]  # never early, FIFO
    assert [p[-1] for p in line.due(1.0)] == [3]
    assert line.report()["dropped_full"] == 1 and line.report()["dropped_not_ipv4"] == 1
