"""Closing a step with two trainers and no fixed head (real DHTs, real libp2p streams): a step
coordinator that dies mid-step is replaced without any replica applying twice, and a trainer that
stops before its ledger has its keys discarded everywhere."""
import asyncio

import pytest

from swarm.data import ByteCorpus
from swarm.ledger import ApplyPlan
from swarm.shards import slots_for
from swarm.trainer import LocalTrainer
from node.inproc import InprocSwarm
from test_swarm_parity import (assert_params_equal, kill, outcome_counts, params, reference_gradients,
                               stage_workers, tiny_run)

pytestmark = pytest.mark.swarm


@pytest.fixture(scope="module")
def corpus():
    return ByteCorpus(max_bytes=1 << 20)


def _record_applies(workers) -> dict:
    """id(worker) -> the results of every apply_step call it served."""
    calls = {id(w): [] for w in workers}
    for worker in workers:
        original = worker.apply_step

        def apply_step(plan, peer_id, worker=worker, original=original):
            result = original(plan, peer_id)
            calls[id(worker)].append(result)
            return result
        worker.apply_step = apply_step
    return calls


def _die_after_stepping_stage(coordinator, stage: int) -> asyncio.Event:
    """The coordinator steps the replicas of `stage` and hangs on every other one (it is about to
    die); the event says the replicas of `stage` applied the step."""
    stepped = asyncio.Event()
    original = coordinator._step_one

    async def step_one(k, peer, plan, group):
        if k != stage:
            await asyncio.Event().wait()
        result = await original(k, peer, plan, group)
        stepped.set()
        return result
    coordinator._step_one = step_one
    return stepped


def test_coordinator_dying_mid_step_is_replaced_and_no_replica_applies_twice(corpus):
    run = tiny_run("takeover")
    ref = LocalTrainer(run, corpus)
    ref.train_step()

    async def go():
        async with InprocSwarm(run, corpus, trainers=2) as sw:
            boss, other = sorted(sw.trainers, key=lambda t: t.peer_id)
            live = [other.worker] + stage_workers(sw, 1) + stage_workers(sw, 2)
            applies = _record_applies(live)
            stepped = _die_after_stepping_stage(boss.coordinator, 1)
            dying = asyncio.create_task(boss.train_step(0))
            taking_over = asyncio.create_task(other.train_step(0))
            await asyncio.wait_for(stepped.wait(), 120)
            await asyncio.to_thread(kill, boss.server)       # dies with stages 0 and 2 not stepped
            result = await asyncio.wait_for(taking_over, 120)
            dying.cancel()
            return result, other.coordinator, live, applies, boss.worker.applied_step

    result, coordinator, live, applies, boss_step = asyncio.run(go())
    outcome = coordinator.closed[0]
    assert result["outcome"]["applied"] and coordinator.stats["takeovers"] == 1
    assert {w.plan.digest() for w in live} == {result["outcome"]["digest"]}  # the plan the dead one handed out
    assert outcome["n_total"] == 4 and len(outcome["owners"]) == 2          # both trainers' keys, as it said
    for worker in live:  # exactly one application per replica; the stage-1 replica answered "duplicate"
        assert [r["duplicate"] for r in applies[id(worker)] if r["applied"]] == [False]
    assert [r["duplicate"] for r in applies[id(live[1])]] == [False, True]
    assert list(outcome_counts(outcome, 2).values()) == [4] and boss_step == -1
    for k in (1, 2):  # live = [the survivor's stage-0 replica, stage 1, stage 2]
        assert_params_equal(ref.model.stages[k], params(live[k]), f"stage {k}")


def test_trainer_that_stops_before_its_ledger_has_its_keys_discarded(corpus):
    run = tiny_run("quitter")
    m = run.train.microbatches

    async def go():
        async with InprocSwarm(run, corpus, trainers=2, barrier_s=60) as sw:
            boss, quitter = sorted(sw.trainers, key=lambda t: t.peer_id)
            mine = slots_for(boss.peer_id, boss.live_trainers(), m)
            theirs = slots_for(quitter.peer_id, quitter.live_trainers(), m)
            assert all(await asyncio.gather(*(quitter.microbatch(0, s) for s in theirs)))
            middle, tail = stage_workers(sw, 1)[0], stage_workers(sw, 2)[0]
            held_before = [len(middle.held(0)), len(tail.held(0))]
            await asyncio.to_thread(kill, quitter.server)     # gone without a ledger
            result = await boss.train_step(0)
            stepped = [params(w) for w in (middle, tail)]
            discarded = [middle.discarded, tail.discarded]
            held_after = [w.held(0) for w in (boss.worker, middle, tail)]
            after = await boss.train_step(1)
            return (boss.peer_id, mine, held_before, result, boss.coordinator.closed[0], stepped, discarded,
                    held_after, after, sw)

    boss, mine, held_before, result, outcome, stepped, discarded, held_after, after, sw = asyncio.run(go())
    assert held_before == [2, 2]                      # the quitter's microbatches reached every stage
    assert held_after == [[], [], []] and discarded == [2, 2]
    assert outcome["n_total"] == 2 and outcome["owners"] == {boss}
    assert [list(outcome_counts(outcome, k).values()) for k in (1, 2)] == [[2], [2]]
    assert result["outcome"]["roster"] == [boss]  # the next step is dealt without it
    # what was applied is the mean over the boss's slots alone: train-local on those slots
    ref = reference_gradients(run, corpus, slots=mine)
    for opt in ref.opts:
        opt.step(0)
    for k, state in zip((1, 2), stepped):
        assert_params_equal(ref.model.stages[k], state, f"stage {k}")
    assert after["slots"] == list(range(m)) and after["finished"] == m and after["outcome"]["applied"]
    assert [w.applied_step for k in (1, 2) for w in stage_workers(sw, k)] == [1, 1]


async def _hide_from(trainer, peer_id: str) -> None:
    """`trainer`'s DHT reads never show `peer_id`'s record (it read before that one was stored)."""
    if trainer.hop._refreshing is not None:
        await trainer.hop._refreshing  # a read in flight would bring the record back
    original = trainer.hop._read

    async def read(*args, **kwargs):
        await original(*args, **kwargs)
        trainer.hop.records[0] = [r for r in trainer.hop.records.get(0, []) if r["peer_id"] != peer_id]
    trainer.hop._read = read
    trainer.hop.records[0] = [r for r in trainer.hop.records.get(0, []) if r["peer_id"] != peer_id]


async def _closed_steps(trainer, n: int) -> list[int]:
    """Train until `n` steps this trainer took part in are closed; the steps it fed."""
    step, fed = 0, []
    while len(fed) < n:
        result = await trainer.train_step(step)
        if result["closed"]:
            fed.append(step)
        step = result["next_step"]
    return fed


def test_a_trainer_that_misses_another_in_the_dht_hears_of_it_and_one_coordinator_closes_the_steps(corpus):
    """Two trainers start together and the higher id's DHT read misses the lower one. The lower one
    (the rightful coordinator) waits for it and probes it with `prepare`; from that call the higher
    one learns of it and hands its ledgers over. A step the higher one closed alone meanwhile left
    the lower one's stage-0 replica behind: it reloads from the other trainer. After that, one
    coordinator closes every step and every replica stands at the same step."""
    run = tiny_run("unseen")

    async def go():
        async with InprocSwarm(run, corpus, trainers=2, barrier_s=30) as sw:
            early, late = sorted(sw.trainers, key=lambda t: t.peer_id)
            await _hide_from(late, early.peer_id)
            assert late.live_trainers() == [late.peer_id]
            fed = await asyncio.wait_for(asyncio.gather(_closed_steps(early, 4), _closed_steps(late, 4)), 240)
            steps = [w.applied_step for w in [early.worker, late.worker] + stage_workers(sw, 1) + stage_workers(sw, 2)]
            return fed, steps, early, late

    (fed_early, fed_late), steps, early, late = asyncio.run(go())
    assert early.peer_id in late.live_trainers()                      # heard, though still not in its DHT read
    assert late.coordinator.stats["steps_closed"] <= 1                # at most the step before it heard
    assert early.coordinator.stats["steps_closed"] >= 3
    assert fed_late[-3:] == fed_early[-3:]                            # the same steps, closed together
    assert len(set(steps)) == 1 and steps[0] == max(fed_late), steps  # nobody left behind


def test_a_microbatch_whose_step_closes_while_it_walks_the_route_is_dropped_and_the_trainer_goes_on(corpus):
    """Another coordinator (one that did not wait for us) steps our stage-0 replica past step 0
    while our microbatch of step 0 is still on its route: the slot is dropped with a warning, the
    trainer does not crash, and its next step trains."""
    run = tiny_run("overtaken")

    async def go():
        async with InprocSwarm(run, corpus) as sw:
            trainer = sw.trainers[0]
            original = trainer.hop.call

            async def call(*args, **fields):
                reply = await original(*args, **fields)
                if fields["step"] == 0:  # the step closed elsewhere meanwhile: an empty plan, as a coordinator sends
                    trainer.worker.apply_step(ApplyPlan(step=0, keys=(), apply={}), trainer.peer_id)
                return reply
            trainer.hop.call = call
            dropped = await trainer.microbatch(0, 0)
            after = await trainer.train_step(1)
            return dropped, trainer.skipped, after, trainer.worker.held(0)

    dropped, skipped, after, held = asyncio.run(go())
    assert dropped is None and skipped == 0 and held == []  # microbatch() reports; train_step counts skips
    assert after["closed"] and after["finished"] == run.train.microbatches
