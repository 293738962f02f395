"""NetnsLab: shaped links are accurate and nothing outlives the lab."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.netns import NetnsLab, cleanup_stale, measure_throughput_mbit, require_root_netns

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


def test_link_bytes_count_the_traffic_of_each_host():
    with NetnsLab(3, rate_mbit=10) as lab:
        before = [lab.link_bytes(i) for i in range(3)]
        got = measure_throughput_mbit(lab, 0, 1, seconds=1.0)
        moved = [lab.link_bytes(i) - b for i, b in zip(range(3), before)]
    payload = got * 1e6 / 8 * 1.0  # at least what the sink counted, on both ends' links
    assert moved[0] >= payload and moved[1] >= payload, (moved, payload)
    assert moved[2] < 0.01 * payload  # a bystander's link saw next to nothing (a bridge floods only unknowns)


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
