"""Churn with real peers: a replica dies mid-step or in the step barrier, a newcomer takes over the
live state. Every key is applied exactly once per stage, or dropped on every stage."""
import asyncio
import threading

import pytest
import torch

from node.dht import start_dht
from node.state_sync import initial_state
from swarm.checkpoint import atomic_write_bytes
from swarm.data import ByteCorpus
from swarm.stage_worker import StageWorker
from swarm.trainer import LocalTrainer
from node.inproc import InprocSwarm
from test_swarm_parity import assert_params_equal, kill, outcome_counts, params, stage_workers, tiny_run

pytestmark = pytest.mark.swarm


@pytest.fixture(scope="module")
def corpus():
    return ByteCorpus(max_bytes=1 << 20)


def _die_on_first(servers, method: str, when=lambda *args: True) -> dict:
    """Wrap `method` of these servers' workers: the first call that satisfies `when` kills its node
    (DHT and p2p daemon gone, so the caller's stream breaks) and raises; every later call on the
    dead node raises too. Returns {"victim": server} once it happened."""
    died, lock = {}, threading.Lock()
    for server in servers:
        original = getattr(server.worker, method)

        def dying(*args, server=server, original=original):
            with lock:
                if "victim" not in died and when(server, *args):
                    died["victim"] = server
                    kill(server)
            if died.get("victim") is server:
                raise RuntimeError("killed")
            return original(*args)
        setattr(server.worker, method, dying)
    return died


def test_replica_killed_mid_backward_is_rerouted_and_every_key_applied_once(corpus):
    """The first stage-1 replica to run a backward dies inside it; its microbatches go to the other
    replica, and the step applies each of the 4 keys exactly once on every stage: as train-local."""
    run = tiny_run("kill")
    ref = LocalTrainer(run, corpus)
    ref.train_step()

    async def go():
        async with InprocSwarm(run, corpus, replicas={1: 2}) as sw:
            died = _die_on_first(sw.servers[1], "finish")
            trainer = sw.trainers[0]
            result = await trainer.train_step(0)
            outcome = trainer.coordinator.closed[0]
            survivor = next(s for s in sw.servers[1] if s is not died["victim"])
            stepped = [params(s.worker) for s in (sw.servers[0][0], survivor, sw.servers[2][0])]
            after = await trainer.train_step(1)   # training goes on with the survivor alone
            return result, outcome, died["victim"], survivor, trainer, stepped, after, sw

    result, outcome, victim, survivor, trainer, stepped, after, sw = asyncio.run(go())
    assert result["finished"] == 4 and result["outcome"]["applied"] and trainer.skipped == 0
    assert trainer.hop.retries + sw.servers[0][0].next_hop.retries >= 1
    assert outcome["n_total"] == 4 and outcome["dropped"] == 0
    stage1 = outcome_counts(outcome, 1)
    assert stage1.get(victim.peer_id) is None and stage1[survivor.peer_id] == 4
    for k in (0, 2):
        assert list(outcome_counts(outcome, k).values()) == [4]
    assert trainer.coordinator.stats["lost"] == 0 and trainer.coordinator.stats["dropped_keys"] == 0
    for k, state in enumerate(stepped):
        assert_params_equal(ref.model.stages[k], state, f"stage {k} after step 0")
    assert after["finished"] == 4 and torch.isfinite(torch.tensor(after["loss"]))
    assert survivor.worker.applied_step == 1


def test_joiner_downloads_live_state_before_serving(corpus):
    run = tiny_run("handoff")

    async def go():
        async with InprocSwarm(run, corpus) as sw:
            for s in range(3):
                await sw.trainers[0].train_step(s)
            live = sw.servers[2][0].worker
            joiner = StageWorker(run, 2)
            return await sw.load_joiner(joiner), live, joiner

    message, live, joiner = asyncio.run(go())
    assert "from live replica" in message and joiner.applied_step == live.applied_step == 2
    for (n, a), b in zip(live.stage.state_dict().items(), joiner.stage.state_dict().values()):
        assert torch.equal(a, b), n
    assert str(live.opt.state_dict()) == str(joiner.opt.state_dict())


def test_no_replica_no_checkpoint_says_initialisation(corpus, tmp_path):
    run = tiny_run("lonely")

    async def go():
        dht = start_dht(run.run_id)
        try:
            p2p = await dht.replicate_p2p()
            worker = StageWorker(run, 1)
            first = await initial_state(dht, p2p, worker, tmp_path / "none.pt", str(dht.peer_id))
            worker.applied_step = 7
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
    """A stage-1 replica dies when the coordinator steps it: its keys die with it (counted as crashed,
    not lost), every other replica applies its own keys, and the next step trains on."""
    run = tiny_run("barrier")

    async def go():
        async with InprocSwarm(run, corpus, replicas={1: 2}) as sw:
            trainer = sw.trainers[0]
            await trainer.train_step(0)
            died = _die_on_first(sw.servers[1], "apply_step",
                                 when=lambda server, plan, peer: plan.step == 1 and plan.keys_for(1, peer))
            result = await trainer.train_step(1)
            outcome = trainer.coordinator.closed[1]
            after = await trainer.train_step(2)
            return died["victim"], result, outcome, after, trainer.coordinator.stats, sw

    victim, result, outcome, after, stats, sw = asyncio.run(go())
    survivor = next(s for s in sw.servers[1] if s is not victim)
    listed = {r["peer_id"]: r["listed"] for r in outcome["results"] if r["stage"] == 1}
    stage1 = outcome_counts(outcome, 1)
    assert listed[victim.peer_id] > 0 and stage1[victim.peer_id] is None
    assert stage1[survivor.peer_id] == listed[survivor.peer_id] == 4 - listed[victim.peer_id]
    assert stats["crashed"] == listed[victim.peer_id] and stats["lost"] == 0
    for k in (0, 2):                                   # no microbatch lost on the other stages
        assert list(outcome_counts(outcome, k).values()) == [4]
    assert [w.applied_step for k in (0, 2) for w in stage_workers(sw, k)] == [2, 2]
    assert survivor.worker.applied_step == 2 and result["outcome"]["applied"]
    assert after["finished"] == 4 and torch.isfinite(torch.tensor(after["loss"]))
