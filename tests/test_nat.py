"""A stage behind a real NAT (iptables MASQUERADE in a router namespace) serves through a relay.

Lab (bench/nat.py): h0 bootstrap (relay), h1 trainer, h2 stage 2 on the public bridge; stage 1's only
replica in the home namespace behind the router. The home node is started with the default
`--reachability auto`: it must find out by itself that it is behind NAT.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.nat import NatLab, require_nat_lab
from node.local import Swarm
from tests.swarm_helpers import tiny_run

REASON = require_nat_lab()
pytestmark = [pytest.mark.swarm, pytest.mark.skipif(REASON is not None, reason=f"NAT lab unavailable: {REASON}")]
REPO = Path(__file__).resolve().parents[1]
HOME_PORT = 31338
STEPS = 6

# Run in a public namespace: dial `peer` at exactly `addr` (no relay, no DHT lookup); print ok or the error.
DIAL = """
import asyncio, sys
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr
async def main(peer, addr):
    p2p = await P2P.create(host_maddrs=["/ip4/0.0.0.0/tcp/0"], nat_port_map=False, auto_nat=False, use_relay=False)
    try:
        await asyncio.wait_for(p2p._client.connect(PeerID.from_base58(peer), [Multiaddr(addr)]), 10)
        print("ok")
    except Exception as e:
        print("failed:", type(e).__name__, e)
    finally:
        await p2p.shutdown()
asyncio.run(main(*sys.argv[1:]))
"""


def peer_id_of(identity: Path) -> str:
    from hivemind.p2p import PeerID
    return PeerID.from_identity(identity.read_bytes()).to_base58()


def dial_directly(lab: NatLab, host: int, peer: str, addr: str) -> str:
    out = subprocess.run(lab.exec_argv(host, [sys.executable, "-c", DIAL, peer, addr]), capture_output=True,
                         text=True, timeout=60, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return (out.stdout.strip().splitlines() or [out.stderr[-300:]])[-1]


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout:.0f}s") from None


def test_home_stage_trains_through_a_relay(tmp_path):
    run = tiny_run("nat")
    with NatLab(3) as lab:
        swarm = Swarm(tmp_path, threads=1, run=run)
        wrap = lambda i: (lambda cmd: lab.exec_argv(i, cmd))  # noqa: E731
        ip = lambda i: lab.hosts[i].ip  # noqa: E731
        try:
            peers = swarm.start_bootstrap(host=ip(0), wrap=wrap(0))
            swarm.start_stage("stage2", 2, peers, host=ip(2), wrap=wrap(2))
            swarm.start_stage("stage1", 1, peers, host=ip(lab.home), extra=["--port", str(HOME_PORT)],
                              wrap=wrap(lab.home))
            swarm.wait_for_line("stage1", "relayed: reachable through", 400)
            home = peer_id_of(tmp_path / "stage1.id")
            refused = dial_directly(lab, 1, home, f"/ip4/{ip(lab.home)}/tcp/{HOME_PORT}")
            assert refused.startswith("failed:"), refused  # the NAT really blocks inbound dials
            swarm.wait_for_line("stage1", "serving", 120)
            swarm.wait_for_line("stage2", "serving", 120)
            trainer = swarm.start_trainer(0, peers, STEPS, host=ip(1), wrap=wrap(1),
                                          extra=["--eval-every", "0", "--checkpoint-dir", ""])
            assert wait_exit(trainer, 600) == 0, (tmp_path / "trainer0.log").read_text()[-3000:]
        finally:
            swarm.stop()
    summary = json.loads((tmp_path / "trainer0.json").read_text())
    assert summary["steps_completed"] == STEPS
    assert summary["train_loss_last"] < summary["train_loss_first"]
    stage1 = [n for n in summary["nodes"] if n["stage"] == 1]
    assert stage1 and stage1[0]["peer_id"] == home and stage1[0]["tokens"] > 0
