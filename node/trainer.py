"""A trainer: a stage-0 replica that feeds its own microbatches into the swarm.

Each step, the roster (the trainers feeding it) deals the step's slots (swarm/shards.py); this
trainer draws its slots' sequences, runs stage 0, and sends each code to a replica of stage 1
(node/route.py), which walks it to the tail and brings the gradient back along the same replicas
together with the route taken. The finished slots and their routes form the trainer's ledger,
which goes to the step coordinator (node/coordinator.py: the lowest live trainer id, maybe this
one); its answer says the step is applied everywhere and who feeds the next one.
"""
from __future__ import annotations

import asyncio
import logging
import time

from protocol.codec import decode, encode, encode_ints
from node.client import PeerUnavailable, RemoteError, StageClient
from node.coordinator import StepCoordinator
from node.route import NoRoute
from node.state_sync import load_from_replicas
from swarm.coordination import coordinator
from swarm.deadlines import Deadline, route_timeout
from swarm.ledger import MicroKey, TrainerLedger
from swarm.shards import slots_for
from swarm.stage_worker import StaleRequest

log = logging.getLogger(__name__)


SUSPECT_S = 30.0   # a coordinator that failed us is skipped this long (2x a DHT record's lifetime)
HEARD_S = 30.0     # a trainer that called us counts as live this long, DHT record or not


def _unexpired(until: dict[str, float]) -> set[str]:
    """The peers of a peer -> expiry (monotonic clock) map whose time has not run out."""
    now = time.monotonic()
    return {p for p, t in until.items() if t > now}


class Stopped(RuntimeError):
    """A stop signal arrived while the trainer was paused waiting for replicas."""


class Trainer:
    def __init__(self, server, corpus, p2p, *, stop: asyncio.Event | None = None, status=None,
                 min_route_timeout_s: float = 30.0, ledger_timeout_s: float = 180.0, barrier_s: float = 10.0,
                 poll_min_s: float = 1.0, poll_max_s: float = 10.0):
        self.server, self.corpus = server, corpus
        self.worker, self.run, self.metrics = server.worker, server.run, server.metrics
        self.cfg, self.peer_id = self.run.model, server.peer_id
        self.hop = server.next_hop                    # to stage 1
        self.p2p, self.client = p2p, StageClient(p2p, self.run)
        self.stop = stop or asyncio.Event()
        self.status = status or (lambda text: log.warning(text))
        self.min_route_timeout_s, self.ledger_timeout_s = min_route_timeout_s, ledger_timeout_s
        self.poll_min_s, self.poll_max_s = poll_min_s, poll_max_s
        self.roster: tuple | None = None              # who feeds the next step (the last outcome said so)
        self.coordinator = server.coordinator = StepCoordinator(self, barrier_s=barrier_s)
        self.suspects: dict[str, float] = {}          # coordinators that did not answer -> until when
        self.heard: dict[str, float] = {}             # trainers that called us -> until when
        server.heard_trainer = self.heard_from
        self.skipped = 0                              # microbatches no route finished in time (dropped everywhere)
        self.unapplied = 0                            # our finished microbatches a step did not apply
        if self.metrics.train_loss is None:
            self.metrics.enable_loss()

    # --- the swarm as this trainer sees it ---------------------------------------------------------
    def live_trainers(self) -> list[str]:
        """Trainers in our DHT read, those that called us lately (they may not be in our read yet:
        two trainers that start together must still agree on the coordinator), and ourselves."""
        return sorted({r["peer_id"] for r in self.hop.records.get(0, [])} | _unexpired(self.heard) | {self.peer_id})

    def heard_from(self, peer: str) -> None:
        if peer != self.peer_id:
            self.heard[peer] = time.monotonic() + HEARD_S

    def roster_for(self, step: int) -> tuple:
        return self.roster if self.roster is not None else tuple(self.live_trainers())

    async def fresh_records(self) -> dict:
        await self.hop.refresh(force=True)
        return self.hop.records

    async def control_call(self, peer: str, stage: int, method: str, timeout: float, **fields) -> dict:
        reply, sent, received = await self.client.call(peer, stage, method, timeout=timeout, **fields)
        self.server.count_message("sent", sent)
        self.server.count_message("received", received)
        return reply

    async def local_call(self, method: str, **fields) -> dict:
        """A control call on our own stage-0 replica, through the same handler a remote one runs."""
        reply, _ = await getattr(self.server, f"_on_{method}")({"group": 1, **fields}, {}, self.peer_id)
        return reply

    async def wait_for_stages(self, stall_timeout: float = float("inf")) -> None:
        """Block until every later stage has a replica: pause with a status line, polling the DHT at
        growing intervals; a stop signal ends the pause with `Stopped`."""
        started, delay = time.monotonic(), self.poll_min_s
        await self.hop.refresh()  # periodic, in the background: a slow DHT peer must not slow every step
        while self.missing_stages():
            await self.fresh_records()  # looks missing: make sure
            missing = self.missing_stages()
            if not missing:
                return
            waited = time.monotonic() - started
            if waited > stall_timeout:
                raise Stopped(f"no replica of stage(s) {missing} for {waited:.0f}s")
            self.status(f"paused: waiting for a replica of stage(s) {', '.join(map(str, missing))} ({waited:.0f}s); "
                        f"start one with `resbm-node join --stage {missing[0]} ...`")
            try:
                await asyncio.wait_for(self.stop.wait(), delay)
                raise Stopped("stopped by a signal while paused")
            except asyncio.TimeoutError:
                delay = min(2 * delay, self.poll_max_s)

    def missing_stages(self) -> list[int]:
        return [k for k in range(1, self.cfg.n_stages) if not self.hop.records.get(k)]

    def route_timeout(self) -> float:
        """Budget of one microbatch's walk: every later stage's advertised time for a step's worth of
        microbatches, with slack for a reroute (swarm/deadlines.py), never below the floor."""
        m = self.run.train.microbatches
        hops = [m / max(min((r["throughput"] for r in self.hop.records.get(k, [])), default=1.0), 1e-3)
                for k in range(1, self.cfg.n_stages)]
        return max(self.min_route_timeout_s, route_timeout(hops))

    # --- one microbatch ----------------------------------------------------------------------------
    async def _local(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.server.executor, fn, *args)

    async def microbatch(self, step: int, micro: int, split: str = "train"):
        """(loss, route) of one slot, or None if no route finished it twice in a row or the step was
        closed without it meanwhile. `split="val"`: the loss alone, nothing held anywhere."""
        train = split == "train"
        t = self.run.train
        x, y = self.corpus.batch(split, t.microbatch_size, self.cfg.seq_len, self.cfg.seed, step if train else 0, micro)
        x, y = x.to(self.worker.device), y.to(self.worker.device)
        key = MicroKey(self.peer_id, step, micro)
        extra = {"tokens": encode_ints(x, self.cfg.vocab_size)} if self.cfg.boundary == "subspace" else {}
        t0 = time.perf_counter()
        if train:
            try:
                handle, code = await self._local(self.worker.begin, key, x, None)
            except StaleRequest as e:  # our replica was stepped past `step` meanwhile: nothing to feed
                log.warning("step %d slot %d: %s", step, micro, e)
                return None
        else:
            code, handle = await self._local(self.worker.evaluate, x), None
        forward_s = time.perf_counter() - t0
        reply = None
        for attempt in (1, 2):
            try:
                reply, _ = await self.hop.call(Deadline(self.route_timeout()), x.numel(), 2 * forward_s,
                                               owner=self.peer_id, step=step, micro=micro, eval=not train,
                                               x=encode(code, self.cfg.wire_codec),
                                               targets=encode_ints(y, self.cfg.vocab_size), **extra)
                break
            except (NoRoute, RemoteError) as e:
                log.warning("step %d slot %d: attempt %d found no route (%s)", step, micro, attempt, e)
                if isinstance(e, RemoteError) and e.reason == "state":
                    break  # the stages are past this step: retrying cannot help
        if reply is None:
            return None
        if not train:
            return float(reply["loss"])
        t1 = time.perf_counter()
        try:
            await self._local(self.worker.finish, key, handle, decode(reply["grad_in"]).to(self.worker.device))
        except StaleRequest as e:  # a coordinator closed `step` without us while the route worked: dropped
            log.warning("step %d slot %d: closed without it meanwhile (%s)", step, micro, e)
            return None
        self.server.count_compute(x, forward_s + time.perf_counter() - t1)
        return float(reply["loss"]), [self.peer_id] + list(reply["route"])

    # --- one step ----------------------------------------------------------------------------------
    async def train_step(self, step: int) -> dict:
        """Feed our slots of `step`, hand the ledger to the coordinator, return once the step is applied."""
        await self.wait_for_stages()
        # a live coordinator steps our replica too: a trainer that just joined may already be past `step`
        step = max(step, self.worker.applied_step + 1)
        m = self.run.train.microbatches
        slots = slots_for(self.peer_id, self.roster_for(step), m)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(self.microbatch(step, s) for s in slots))
        t1 = time.perf_counter()
        ledger = TrainerLedger(self.peer_id, step, self.cfg.n_stages)
        losses = []
        for slot, result in zip(slots, results):
            if result is None:
                self.skipped += 1
                continue
            losses.append(result[0])
            ledger.record(slot, result[1])
        if slots and not ledger.routes:
            self.status(f"paused: no microbatch of step {step} got through (a stage's replicas do not answer); "
                        f"trying again")
        outcome = await self.hand_in(ledger)
        if not outcome["applied"] and ledger.routes:
            self.unapplied += len(ledger.routes)
            log.warning("step %d: the coordinator did not apply our %d microbatch(es)", step, len(ledger.routes))
        self.roster = tuple(outcome["roster"])
        await self.catch_up(outcome["closed"])
        phases = {"route": t1 - t0, "close": time.perf_counter() - t1}  # our slots' walks; the step's closing
        for phase, seconds in phases.items():
            self.metrics.step_phase_seconds.labels(phase).observe(seconds)
        if self.peer_id not in self.roster:
            log.warning("step %d: not in the next roster; reporting again to get back in", step)
        loss = sum(losses) / len(losses) if losses else float("nan")
        if losses:
            self.metrics.train_loss.set(loss)
        return {"loss": loss, "slots": list(slots), "finished": len(losses), "closed": outcome["closed"] >= step,
                "next_step": max(step, outcome["closed"] + 1), "outcome": outcome, "phases": phases}

    async def catch_up(self, closed: int) -> None:
        """Our stage-0 replica missed steps up to `closed` (a coordinator that did not know us yet
        stepped the others): reload it from a trainer that applied them, as a joiner does."""
        if self.worker.applied_step >= closed:
            return
        steps = {r["peer_id"]: r["step"] for r in self.hop.records.get(0, [])}
        others = sorted((p for p in self.live_trainers() if p != self.peer_id),  # heard-only ones called us: ahead
                        key=lambda p: -steps.get(p, float("inf")))
        missed = self.worker.applied_step
        peer = await load_from_replicas(self.p2p, self.worker, others,
                                        lambda state: self._local(self.worker.load_state_dict, state), missed)
        if peer is None:
            log.warning("our stage-0 replica missed steps up to %d and no trainer handed us a newer state", closed)
        else:
            log.warning("our stage-0 replica missed steps %d..%d: reloaded from trainer %s at step %d",
                        missed + 1, closed, peer[-8:], self.worker.applied_step)

    async def hand_in(self, ledger: TrainerLedger) -> dict:
        """Our ledger to the coordinator of the moment; one that does not answer is suspected, and the
        next lowest id takes over (in the end ourselves)."""
        while True:
            boss = coordinator(self.live_trainers(), _unexpired(self.suspects)) or self.peer_id
            if boss == self.peer_id:
                return await self.coordinator.receive(ledger)
            try:
                return await self.control_call(boss, 0, "ledger", timeout=self.ledger_timeout_s, step=ledger.step,
                                               ledger=ledger.to_wire())
            except (PeerUnavailable, RemoteError) as e:
                log.warning("step coordinator %s did not close step %d (%s); the next trainer takes over", boss[-8:],
                            ledger.step, e)
                # not asked again until its DHT record has surely expired
                self.suspects[boss] = time.monotonic() + SUSPECT_S
                await self.fresh_records()

    async def evaluate(self, batches: int = 8) -> float:
        losses = [v for v in await asyncio.gather(*(self.microbatch(0, i, split="val") for i in range(batches)))
                  if v is not None]
        loss = sum(losses) / len(losses) if losses else float("nan")
        self.metrics.val_loss.set(loss)
        return loss
