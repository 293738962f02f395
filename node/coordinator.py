"""Closing a step without a fixed head: whichever trainer is the step coordinator of the moment.

Every trainer runs a StepCoordinator; it acts only when ledgers reach it (swarm/coordination.py
says who that is: the lowest live trainer id). For step s it waits for the roster's ledgers (or
the barrier deadline; an absent member that does not even answer `info` is given up at once),
merges them into an apply plan (swarm/ledger.py), asks every live replica of every stage which
keys it holds, drops keys that a replica on their route lost (everywhere, so none is applied on
some stages only), and steps every replica with the plan. The trainers' ledger calls are answered
with the outcome and the next step's roster.

A coordinator that dies mid-step is replaced by the next lowest id. Replicas keep the plan they
applied; the new coordinator asks for it first and hands the same plan to the rest, so no step is
ever applied under two plans, and a replica that already applied it answers "duplicate".
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from node.client import PeerUnavailable, RemoteError
from swarm.coordination import Barrier, adopt_plan, next_roster
from swarm.ledger import ApplyPlan, MicroKey, merge_ledgers, pack_plan, unpack_plan, without_keys

log = logging.getLogger(__name__)
KEEP_OUTCOMES = 32   # closed steps remembered for late ledgers


@dataclass
class Pending:
    ledgers: dict = field(default_factory=dict)      # owner -> TrainerLedger
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Future | None = None
    task: asyncio.Task | None = None                 # held: the loop keeps only a weak reference to tasks


class StepCoordinator:
    def __init__(self, trainer, barrier_s: float = 10.0, call_timeout_s: float = 30.0, probe_s: float = 1.0,
                 probe_timeout_s: float = 2.0):
        self.trainer = trainer
        self.run, self.n_stages = trainer.run, trainer.run.model.n_stages
        self.barrier_s, self.call_timeout_s, self.probe_s = barrier_s, call_timeout_s, probe_s
        self.probe_timeout_s = probe_timeout_s
        self.pending: dict[int, Pending] = {}
        self.joiners: set[str] = set()   # trainers whose ledger came after their step closed
        self.closed: OrderedDict[int, dict] = OrderedDict()
        self.stats = {"steps_closed": 0, "takeovers": 0, "dropped_keys": 0, "lost": 0, "crashed": 0}

    async def receive(self, ledger) -> dict:
        """A trainer's ledger of its step; answered once that step is closed."""
        if ledger.step in self.closed:  # late: it feeds (and is waited for) from the next step on
            self.joiners.add(ledger.owner)
            return {**self._reply(self.closed[ledger.step], ledger.owner), "roster": sorted(
                set(self.closed[ledger.step]["roster"]) | {ledger.owner})}
        if self.closed and ledger.step < min(self.closed):
            last = self.closed[next(reversed(self.closed))]
            return {**self._reply(last, ledger.owner), "applied": False}
        p = self.pending.get(ledger.step)
        if p is None:
            p = self.pending[ledger.step] = Pending(done=asyncio.get_running_loop().create_future())
            p.task = asyncio.create_task(self._close_guarded(ledger.step, p))
        p.ledgers[ledger.owner] = ledger
        p.changed.set()
        return self._reply(await asyncio.shield(p.done), ledger.owner)

    @staticmethod
    def _reply(outcome: dict, owner: str) -> dict:
        return {"applied": owner in outcome["owners"], "roster": list(outcome["roster"]), "digest": outcome["digest"],
                "closed": outcome.get("closed", outcome["step"])}

    async def _close_guarded(self, step: int, p: Pending) -> None:
        try:
            outcome = await self._close(step, p)
        except Exception as e:  # answer the waiting trainers; they carry on with the next step
            log.exception("closing step %d failed", step)
            outcome = {"step": step, "owners": set(), "roster": tuple(sorted(p.ledgers)), "digest": "",
                       "error": str(e)}
        if not outcome.get("empty"):  # an empty step is tried again: its next ledgers start a new barrier
            self.closed[step] = outcome
        while len(self.closed) > KEEP_OUTCOMES:
            self.closed.popitem(last=False)
        self.pending.pop(step, None)
        p.done.set_result(outcome)

    # --- the phases ------------------------------------------------------------------------------
    async def _close(self, step: int, p: Pending) -> dict:
        reported, absent = await self._barrier(step, p)
        plan = merge_ledgers(step, p.ledgers.values(), reported, self.n_stages)
        prepared = await self._prepare(step, plan)
        adopted, conflict = adopt_plan(step, [unpack_plan(r["plan"], self.n_stages) for r in prepared.values()
                                              if r is not None and r.get("plan")])
        if adopted is not None:
            self.stats["takeovers"] += 1
            log.warning("step %d was partly applied by a previous coordinator: handing out its plan %s%s", step,
                        adopted.digest(), " (plans conflicted: the lowest digest wins)" if conflict else "")
            plan = adopted
        else:
            plan = self._without_lost(plan, prepared)
        roster = next_roster(self.trainer.live_trainers(), reported, absent)
        if not plan.keys:  # no microbatch got through: nothing to apply, and the step is not over
            # unless replicas are past it (another coordinator that had not seen us stepped them):
            # the trainers then go on after the furthest step applied
            applied = max([step - 1] + [r["applied_step"] for r in prepared.values() if r is not None])
            log.warning("step %d: no microbatch finished; nothing applied, %s", step,
                        "the step is tried again" if applied < step else f"the replicas are at step {applied}")
            return {"step": step, "empty": True, "owners": set(), "digest": "", "roster": roster, "closed": applied}
        group = {}
        for (stage, _), reply in prepared.items():
            if reply is not None:
                group[stage] = group.get(stage, 0) + 1
        results = await asyncio.gather(*(self._step_one(stage, peer, plan, group.get(stage, 1))
                                         for (stage, peer), reply in prepared.items() if reply is not None))
        self._count_failures(plan, results)
        self.stats["steps_closed"] += 1
        return {"step": step, "owners": {k.owner for k in plan.keys}, "digest": plan.digest(),
                "roster": roster, "n_total": plan.n_total, "dropped": len(plan.dropped),
                "results": results}

    async def _barrier(self, step: int, p: Pending) -> tuple[tuple, tuple]:
        """Wait for the roster's ledgers. An absent member is probed with `prepare`, which also tells a
        trainer that has not seen us in the DHT yet that we exist (it then hands its ledgers to us):
        one that does not answer is given up at once, and so is one already past this step (another
        coordinator stepped it)."""
        roster = tuple(sorted(set(self.trainer.roster_for(step)) | {self.trainer.peer_id} | self.joiners))
        self.joiners.clear()
        deadline = time.monotonic() + self.barrier_s
        gone: set[str] = set()
        while True:
            barrier = Barrier(step, tuple(m for m in roster if m not in gone), deadline)
            go, absent = barrier.outcome(p.ledgers, time.monotonic())
            if go:
                return tuple(sorted(p.ledgers)), tuple(sorted(set(absent) | gone))
            p.changed.clear()
            probes = await asyncio.gather(*(self._call(0, m, "prepare", timeout=self.probe_timeout_s, step=step)
                                            for m in absent))
            gone |= {m for m, r in zip(absent, probes) if r is None or r["applied_step"] >= step}
            try:
                await asyncio.wait_for(p.changed.wait(), self.probe_s)
            except asyncio.TimeoutError:
                pass

    async def _prepare(self, step: int, plan: ApplyPlan) -> dict:
        """Every live replica of every stage (and every one the plan names): what it holds of `step`,
        or None if it did not answer."""
        # the routes' records (refreshed in the background every few seconds): a forced DHT read per
        # step cost a tiny model's trainer more bytes than its codes; a replica that joined since the
        # last refresh is stepped from the next step on (it holds no key of this one)
        await self.trainer.hop.refresh()
        records = self.trainer.hop.records
        targets = sorted({(k, r["peer_id"]) for k, recs in records.items() for r in recs} | set(plan.apply)
                         | {(0, p) for p in self.trainer.live_trainers()})  # a trainer that called us, too
        replies = await asyncio.gather(*(self._call(stage, peer, "prepare", step=step) for stage, peer in targets))
        return dict(zip(targets, replies))

    def _without_lost(self, plan: ApplyPlan, prepared: dict) -> ApplyPlan:
        """Keys whose gradient some replica on their route no longer holds are dropped everywhere."""
        lost = set()
        for (stage, peer), keys in plan.apply.items():
            reply = prepared.get((stage, peer))
            held = {MicroKey.from_wire(k) for k in reply["held"]} if reply is not None else set()
            lost |= set(keys) - held
        if lost:
            self.stats["dropped_keys"] += len(lost)
            log.warning("step %d: %d microbatch(es) dropped on every stage: a replica on their route lost them",
                        plan.step, len(lost))
            plan = without_keys(plan, lost, "a replica on its route lost it")
        return plan

    async def _step_one(self, stage: int, peer: str, plan: ApplyPlan, group: int) -> dict:
        reply = await self._call(stage, peer, "step", plan=pack_plan(plan), group=group, errors=True)
        listed = len(plan.keys_for(stage, peer))
        if isinstance(reply, Exception):
            log.warning("stage %d replica %s did not apply step %d: %s", stage, peer[-8:], plan.step, reply)
            return {"stage": stage, "peer_id": peer, "failed": type(reply).__name__, "listed": listed}
        return {"stage": stage, "peer_id": peer, "listed": listed, **{k: reply[k] for k in
                ("applied", "micro_count", "duplicate", "grad_norm") if k in reply}}

    def _count_failures(self, plan: ApplyPlan, results) -> None:
        """Keys a live replica refused to apply are lost; keys of a replica that vanished died with it."""
        for r in results:
            if r.get("failed") == "RemoteError":
                self.stats["lost"] += r["listed"]
            elif r.get("failed"):
                self.stats["crashed"] += r["listed"]

    async def _call(self, stage: int, peer: str, method: str, errors: bool = False, timeout: float | None = None,
                    **fields):
        """A control call; our own replica is called in-process. None (or the error, with `errors`)
        when the replica did not answer."""
        try:
            if stage == 0 and peer == self.trainer.peer_id:
                return await self.trainer.local_call(method, **fields)
            return await self.trainer.control_call(peer, stage, method, timeout=timeout or self.call_timeout_s,
                                                   **fields)
        except (PeerUnavailable, RemoteError) as e:
            log.info("%s on stage %d replica %s failed: %s", method, stage, peer[-8:], e)
            return e if errors else None
