"""A stage behind a real NAT (iptables MASQUERADE in a router namespace) serves through a relay.

Lab (bench/nat.py): h0 bootstrap (a relay), h1 trainers, h2 stage 2 (a second relay) on the public
bridge; stage 1's only replica in the home namespace behind the router. The home node is started
with `--reachability auto`: it must find out by itself that it is behind NAT.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.nat import (BOOT, HOME_PORT, STAGE2, STAGE2_PORT, STARTUP_LABS, TRAINER, NatLab, peer_id_of,
                       require_nat_lab, stage2_addr, start_swarm, start_trainer)
from node.local_swarm import Swarm
from tests.swarm_helpers import tiny_run

REASON = require_nat_lab()
pytestmark = [pytest.mark.swarm, pytest.mark.skipif(REASON is not None, reason=f"NAT lab not run: {REASON}")]
REPO = Path(__file__).resolve().parents[1]
STEPS = 6

# Run in a public namespace: dial `peer` at exactly `addr` (no DHT lookup), or through the relay `via`
# (a peer id) at `addr`; print ok or the error. The circuit address is encoded by hand: hivemind's
# multiaddr library writes a /p2p/ value as a CID, which p2pd's Go parser refuses ("length greater
# than remaining number of bytes in buffer").
DIAL = """
import asyncio, sys
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr
async def main(peer, addr, via):
    target = Multiaddr(addr)
    if via != "-":
        relay = PeerID.from_base58(via).to_bytes()
        target = Multiaddr(target.to_bytes() + bytes([0xa5, 0x03, len(relay)]) + relay + bytes([0xa2, 0x02]))
    p2p = await P2P.create(host_maddrs=["/ip4/0.0.0.0/tcp/0"], nat_port_map=False, auto_nat=False,
                           use_relay=via != "-")
    try:
        await asyncio.wait_for(p2p._client.connect(PeerID.from_base58(peer), [target]), 10)
        print("ok")
    except Exception as e:
        print("failed:", type(e).__name__, e)
    finally:
        await p2p.shutdown()
asyncio.run(main(*sys.argv[1:]))
"""


def dial(lab: NatLab, host: int, peer: str, addr: str, via: str = "-") -> str:
    out = subprocess.run(lab.exec_argv(host, [sys.executable, "-c", DIAL, peer, addr, via]), capture_output=True,
                         text=True, timeout=60, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return out.stdout.strip() or out.stderr[-300:]


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout:.0f}s") from None


def trained(swarm: Swarm, i: int, proc: subprocess.Popen, home: str) -> dict:
    """Trainer i's summary once it finished its steps, after checking it trained through `home`."""
    assert wait_exit(proc, 600) == 0, (swarm.run_dir / f"trainer{i}.log").read_text()[-3000:]
    summary = json.loads((swarm.run_dir / f"trainer{i}.json").read_text())
    assert summary["steps_completed"] == STEPS
    assert summary["train_loss_last"] < summary["train_loss_first"], summary["loss_curve"]
    stage1 = [n for n in summary["nodes"] if n["stage"] == 1]
    assert [n["peer_id"] for n in stage1] == [home] and stage1[0]["tokens"] > 0, stage1
    return summary


def test_home_stage_trains_through_a_relay_and_moves_to_the_other_relay_when_one_dies(tmp_path):
    run = tiny_run("nat")
    with NatLab(3) as lab:
        swarm = Swarm(tmp_path, threads=1, run=run)
        try:
            peers = start_swarm(lab, swarm, relayed=True, second_relay=True)
            home = peer_id_of(tmp_path / "stage1.id")
            direct = dial(lab, TRAINER, home, f"/ip4/{lab.hosts[lab.home].ip}/tcp/{HOME_PORT}")
            assert direct.startswith("failed:"), direct  # the NAT really blocks inbound dials
            first = trained(swarm, 0, start_trainer(lab, swarm, peers, STEPS), home)

            # kill -9 the bootstrap's main process (its p2pd, the relay, dies with it): the home node
            # is still reachable through the other relay, and a new trainer, which can only join
            # through a live peer now, trains through it
            boot = next(proc for name, proc, _ in swarm.procs if name == "bootstrap")
            os.kill(boot.pid, signal.SIGKILL)
            boot.wait()
            relayed, deadline = "", time.monotonic() + 180
            while relayed != "ok" and time.monotonic() < deadline:
                relayed = dial(lab, TRAINER, home, f"/ip4/{lab.hosts[STAGE2].ip}/tcp/{STAGE2_PORT}",
                               via=peer_id_of(tmp_path / "stage2.id"))
            assert relayed == "ok", relayed
            second = trained(swarm, 1, start_trainer(lab, swarm, [stage2_addr(lab, swarm)], STEPS, i=1), home)
        finally:
            swarm.stop()
    assert first["fingerprint"] == second["fingerprint"]
    log = (tmp_path / "stage1.log").read_text()
    assert "reachability private" in log or "behind NAT" in log, log[-2000:]
    assert "could not reach port(s) [31338]" in log, log[-2000:]  # the dial-back probe found the NAT


def test_dialable_home_in_a_routed_private_network_serves_directly_within_seconds(tmp_path):
    """Every host on private 10.x addresses, home behind a router that forwards without NAT: the address
    guess says "behind NAT" (a private source address through a router), the bootstrap's dial-back says
    dialable, and the node serves at once instead of waiting minutes for a relay reservation."""
    run = tiny_run("routed")
    with NatLab(1, nat=False, subnet=STARTUP_LABS["routed"][0]) as lab:
        swarm = Swarm(tmp_path, threads=1, run=run)
        try:
            peers = swarm.start_bootstrap(host=lab.hosts[BOOT].ip, wrap=lambda cmd: lab.exec_argv(BOOT, cmd),
                                          extra=["--reachability", "public"])
            t0 = time.monotonic()
            swarm.start_stage("stage1", 1, peers, host=lab.hosts[lab.home].ip, wrap=lambda cmd: lab.exec_argv(lab.home, cmd),
                              extra=["--port", str(HOME_PORT), "--reachability", "auto"])
            swarm.wait_for_line("stage1", "stage 1 serving", 120)
            took = time.monotonic() - t0
            direct = dial(lab, BOOT, peer_id_of(tmp_path / "stage1.id"), f"/ip4/{lab.hosts[lab.home].ip}/tcp/{HOME_PORT}")
        finally:
            swarm.stop()
    log = (tmp_path / "stage1.log").read_text()
    assert "dialable, no relay needed" in log and "behind NAT" not in log, log[-2000:]
    assert direct == "ok" and took < 60, (direct, took)
