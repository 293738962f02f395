"""Churn with real peers: a replica dies mid-backward, a newcomer takes over the live state."""
import asyncio
import threading
import time

import pytest
import torch

from node.dht import start_dht
from node.state_sync import initial_state
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.model import lm_loss
from swarm.stage_worker import StageWorker
from swarm.trainer import LocalTrainer
from node.inproc import InprocSwarm

pytestmark = pytest.mark.swarm


@pytest.fixture(scope="module")
def corpus():
    return ByteCorpus(max_bytes=1 << 20)


def _run(run_id):
    model = ModelConfig(d_model=64, n_layers=3, n_heads=2, seq_len=32, n_stages=3, ratio=16)
    return RunConfig(model=model, train=TrainConfig(batch_size=8, microbatches=4), run_id=run_id)


def test_replica_killed_mid_backward_step_completes_with_equal_gradients(corpus):
    run = _run("kill")
    ref = LocalTrainer(run, corpus)
    for micro in range(4):
        x, y = ref.microbatch("train", 0, micro)
        (lm_loss(ref.model(x), y) / 4).backward()

    async def go():
        async with InprocSwarm(run, corpus, replicas={1: 2}) as sw:
            a, b = sw.servers[1]
            dht_of = {s.peer_id: d for s, d in zip([a, b], sw.dhts[1:3])}
            calls = {"n": 0}
            victim = {}

            def dying(server):
                original = server.worker.backward

                def backward(*args):
                    calls["n"] += 1
                    if calls["n"] == 2:  # the second backward of the step, wherever it lands: kill that peer
                        victim["peer"] = server.peer_id
                        dht_of[server.peer_id].shutdown()  # its p2pd dies: the open stream breaks
                        time.sleep(5)
                        raise RuntimeError("killed")
                    return original(*args)
                return backward

            for s in (a, b):
                s.worker.backward = dying(s)
            losses = await asyncio.gather(*(sw.head.microbatch(0, i) for i in range(4)))
            await sw.head._settle(0)
            survivor = b if victim["peer"] == a.peer_id else a
            grads = {n: p.grad.clone() for n, p in survivor.worker.stage.named_parameters()}
            held = survivor.worker.held(0)
            result = await sw.head.train_step(1)  # training goes on with the survivor alone
            return losses, grads, held, sw.head.retries, sw.head.lost, result

    losses, grads, held, retries, lost, result = asyncio.run(go())
    assert held == [0, 1, 2, 3]          # every microbatch counted exactly once, on the survivor
    assert retries >= 1 and lost == 0
    for n, p in ref.model.stages[1].named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert torch.isfinite(torch.tensor(result["loss"]))


def test_joiner_downloads_live_state_before_serving(corpus):
    run = _run("handoff")

    async def go():
        async with InprocSwarm(run, corpus) as sw:
            for s in range(3):
                await sw.head.train_step(s)
            live = sw.servers[2][0].worker
            joiner = StageWorker(run, 2)
            return await sw.load_joiner(joiner), live, joiner

    message, live, joiner = asyncio.run(go())
    assert "from live replica" in message and joiner.applied_step == live.applied_step == 2
    for (n, a), b in zip(live.stage.state_dict().items(), joiner.stage.state_dict().values()):
        assert torch.equal(a, b), n
    assert str(live.opt.state_dict()) == str(joiner.opt.state_dict())


def test_no_replica_no_checkpoint_says_initialisation(corpus, tmp_path):
    run = _run("lonely")

    async def go():
        dht = start_dht(run.run_id)
        try:
            p2p = await dht.replicate_p2p()
            worker = StageWorker(run, 1)
            first = await initial_state(dht, p2p, worker, tmp_path / "none.pt", str(dht.peer_id))
            worker.applied_step = 7
            from swarm.checkpoint import atomic_write_bytes
            atomic_write_bytes(worker.state_bytes(), tmp_path / "c.pt")
            again = StageWorker(run, 1)
            second = await initial_state(dht, p2p, again, tmp_path / "c.pt", str(dht.peer_id))
            await p2p.shutdown()
            return first, second, again.applied_step
        finally:
            dht.shutdown()

    first, second, step = asyncio.run(go())
    assert "starting from initialisation" in first
    assert "resumed from checkpoint" in second and step == 7


def test_replica_dying_in_the_step_barrier_loses_no_microbatch(corpus):
    run = _run("barrier")

    async def go():
        async with InprocSwarm(run, corpus, replicas={1: 2}) as sw:
            a, b = sw.servers[1]
            dht_of = {s.peer_id: d for s, d in zip([a, b], sw.dhts[1:3])}
            await sw.head.train_step(0)
            held = {}

            def dying(server):
                original = server.worker.apply_step

                def apply_step(step, expect=None, catchup=False):
                    if step == 1 and not catchup and "victim" not in held and server.worker.held(step):
                        held["victim"] = (server.peer_id, server.worker.held(step))
                        dht_of[server.peer_id].shutdown()  # dies before applying anything
                        time.sleep(3)
                        raise RuntimeError("killed")
                    return original(step, expect, catchup)
                return apply_step

            # the first replica stepped that holds microbatches of step 1 dies
            for s in (a, b):
                s.worker.apply_step = dying(s)
            sw.head.router.rng.seed(1)
            result = await sw.head.train_step(1)
            survivor = b if held["victim"][0] == a.peer_id else a
            return held["victim"][1], sw.head.lost, sw.head.recomputed, survivor.worker.applied_step, result

    victim_micros, lost, recomputed, step, result = asyncio.run(go())
    assert lost == 0
    assert victim_micros and recomputed >= len(victim_micros)  # its microbatches were applied elsewhere
    assert step == 1 and torch.isfinite(torch.tensor(result["loss"]))
