"""A joiner's state download is one consistent snapshot, however many steps the serving replica applies
meanwhile; and a joiner never takes initialisation while a live replica of its stage exists: it retries
and says why (node/state_sync.py, the state handler of node/stage_server.py)."""
import asyncio
import contextlib
import logging

import pytest
import torch

from node.announce import Announcer
from node.dht import start_dht, visible_maddrs
from node.metrics import NodeMetrics
from node.stage_server import STATE_CHUNK, StageServer, StateSnapshots, state_chunk_bytes
from node.state_sync import download_state, initial_state
from protocol.signing import Ed25519RecordValidator
from swarm.stage_worker import StageWorker
from tests.swarm_helpers import tiny_run

pytestmark = pytest.mark.swarm


@contextlib.asynccontextmanager
async def replica_and_joiner(run, state_chunk: int = STATE_CHUNK):
    """A bootstrap, one replica of stage 1 (its handlers not yet added: server.p2p and server.dht are its
    own) and a joiner's DHT peer and p2p."""
    dhts, p2ps = [], []
    try:
        dhts.append(start_dht(run.run_id))
        peers = visible_maddrs(dhts[0])
        for _ in range(2):
            dhts.append(start_dht(run.run_id, peers))
            p2ps.append(await dhts[-1].replicate_p2p())
        worker = StageWorker(run, 1)
        server = StageServer(worker, NodeMetrics(), str(dhts[1].peer_id), dht=dhts[1], p2p=p2ps[0],
                             state_chunk=state_chunk)
        server.p2p, server.dht = p2ps[0], dhts[1]
        yield server, dhts[2], p2ps[1]
    finally:
        for p2p in p2ps:
            with contextlib.suppress(Exception):
                await p2p.shutdown()
        for dht in dhts:
            dht.shutdown()


def _step(worker, by: float = 1.0) -> None:
    """What a step (or an averaging round) does to the state: new weights, and here a new step label."""
    worker.change_weights(lambda params: [p.data.add_(by) for p in params])
    worker.applied_step += 1


def test_download_is_one_snapshot_while_the_replica_keeps_stepping():
    run = tiny_run("snapshot")

    async def go():
        async with replica_and_joiner(run, state_chunk=16 << 10) as (server, joiner, p2p):  # a step after each
            worker = server.worker
            _step(worker)
            before = {k: v.clone() for k, v in worker.stage.state_dict().items()}
            on_state, served = server.handlers["state"], []

            async def then_step(f, tensors, peer):
                reply = await on_state(f, tensors, peer)
                served.append(f["offset"])
                await server.in_worker(_step, worker)
                return reply
            server.handlers["state"] = then_step
            await server.add_p2p_handlers(server.p2p)
            state = await download_state(p2p, run, 1, server.peer_id, timeout=20)
            return state, before, served, worker.applied_step

    state, before, served, now = asyncio.run(go())
    assert len(served) >= 4 and now == len(served)          # the replica stepped after every chunk
    assert state["step"] == 0                                # ... and the joiner got the state of step 0,
    for name, tensor in before.items():                      # exactly as it was when the download began
        assert torch.equal(state["model"][name], tensor), name


def test_snapshots_are_shared_per_generation_and_bounded():
    snaps = StateSnapshots(keep=2)
    a = snaps.take(1, 0, b"a")
    assert snaps.take(1, 0, b"a")[0] == a[0]                 # a second joiner of the same weights shares it
    b, c = snaps.take(2, 1, b"b"), snaps.take(3, 2, b"c")
    assert snaps.get(a[0]) is None and snaps.get(b[0])[2] == b"b" and snaps.get(c[0])[1] == 2


def test_joiner_retries_instead_of_initialising_while_a_replica_lives(caplog):
    run = tiny_run("noinit")

    async def go():
        async with replica_and_joiner(run) as (server, joiner, p2p):
            for _ in range(3):
                _step(server.worker)
            ann = Announcer(server.dht, run.run_id, server.peer_id, Ed25519RecordValidator())
            assert await ann.publish(1, run.fingerprint, 1.0, 0, server.worker.applied_step, ttl=300)
            fresh = StageWorker(run, 1)
            # the replica is live (its record says so) but does not hand over its state yet
            task = asyncio.create_task(initial_state(joiner, p2p, fresh, None, str(joiner.peer_id), retry_s=0.5))
            for _ in range(150):
                if "none handed over its state" in caplog.text:
                    break
                await asyncio.sleep(0.2)
            waited = not task.done()
            await server.add_p2p_handlers(server.p2p)
            message = await asyncio.wait_for(task, 60)
            return waited, message, fresh.applied_step, server.worker.applied_step

    with caplog.at_level(logging.INFO, logger="resbm.state"):
        waited, message, step, live = asyncio.run(go())
    assert "1 live replica(s), but none handed over its state" in caplog.text and "retrying" in caplog.text
    assert waited and "from live replica" in message and step == live == 2


def test_a_slow_link_serves_its_state_in_short_replies():
    assert state_chunk_bytes(10.0) == STATE_CHUNK            # the default link: 2 MiB replies, as before
    assert state_chunk_bytes(0.5) == 125_000                 # 2 s of 0.5 Mbit/s: well inside a call's 60 s
    assert state_chunk_bytes(0.01) == 64 << 10               # a floor, so a state is not a million calls
