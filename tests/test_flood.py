"""A stranger floods a stage of a training swarm (tests/peers/flood.py): the stage's memory stays
bounded and the trainer keeps stepping."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.runtime import identity_peer_id
from node.local_swarm import Swarm
from swarm_helpers import tiny_run, trainer_steps

pytestmark = pytest.mark.swarm
ROOT = Path(__file__).resolve().parent.parent


def group_rss_mb(pid: int) -> float:
    """RSS of a node: its main process and everything in its session (p2pd, hivemind helpers)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            if int(stat[3]) == pid:
                total += int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            continue
    return total / 2 ** 20


def rate(log: Path, seconds: float) -> float:
    start = trainer_steps(log)
    time.sleep(seconds)
    return (trainer_steps(log) - start) / seconds


def test_flood_of_state_and_forward_requests_is_capped(tmp_path):
    trainer_id = identity_peer_id(str(tmp_path / "trainer0.id"))
    swarm = Swarm(tmp_path, 1, tiny_run("flood", [trainer_id]))
    attacker = None
    try:
        peers = swarm.start_bootstrap()
        stage1 = swarm.start_stage("stage1", 1, peers)
        swarm.start_stage("stage2", 2, peers)
        for name in ("stage1", "stage2"):
            swarm.wait_for_line(name, "serving", 120)
        stage1_peer = (tmp_path / "stage1.log").read_text().split("peer ")[1].split()[0]
        swarm.start_trainer(0, peers, 100000, extra=["--eval-every", "0"])
        log = tmp_path / "trainer0.log"
        deadline = time.time() + 120
        while trainer_steps(log) < 5 and time.time() < deadline:
            time.sleep(1)
        undisturbed = rate(log, 20)
        rss_before = group_rss_mb(stage1.pid)
        attacker = subprocess.Popen([sys.executable, str(ROOT / "tests" / "peers" / "flood.py"),
                                     str(tmp_path / "config.json"), stage1_peer, *peers], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                    start_new_session=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        first = json.loads(attacker.stdout.readline())
        during = rate(log, 20)
        rss_during = group_rss_mb(stage1.pid)
        assert stage1.poll() is None
    finally:
        if attacker is not None:
            os.killpg(attacker.pid, signal.SIGKILL)
            attacker.wait()
        swarm.stop()
    assert sum(first.values()) == 300 and first.get("busy", 0) > 0, first  # caps answered at once
    assert set(first) <= {"ok", "busy"}, first                                # nothing dropped or broken
    assert rss_during - rss_before < 200, (rss_before, rss_during)
    print(f"\ntrainer steps/s: {undisturbed:.2f} undisturbed, {during:.2f} during the flood")
    assert undisturbed > 0 and during >= 0.5 * undisturbed, (undisturbed, during)
