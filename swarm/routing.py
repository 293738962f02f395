"""Choosing a replica per stage for each microbatch (SWARM's balancer, Petals' bans).

The expected finish time of a new task on a replica is
    (tasks this node has in flight there + 1) * expected seconds per task,
where seconds per task is an EMA of what this node observed, or 1/throughput advertised in the
replica's DHT record before the first observation, times RELAY_PENALTY for a replica that is only
reachable through a relay (its record says relayed: true; Petals likewise scales a relayed server's
network throughput by 0.2), so direct replicas are preferred while they are not much busier. A new
task goes to a replica drawn with probability proportional to 1 / its expected finish time (SWARM's
stochastic wiring), not to the single best: a replica whose first calls were slow (connection set-up,
a transient refusal) still gets its share, so its estimate recovers instead of being starved by the
replica that happened to answer first.
Slots (a caller that knows its own peer id): the callers of a stage -- the replicas of the stage
before it -- split the stage's replicas among themselves in contiguous slots, caller r of n taking
[r/n, (r+1)/n) of the replicas laid out in peer-id order (`slot_shares`), and each replica's weight above
is multiplied by (its share of this caller's slot + SLOT_FLOOR). Every caller derives the same layout
from the same records, so the slots cover each replica equally and nobody herds, and with as many
callers as replicas each caller talks mostly to one replica, and fewer TCP flows share each link's
queue (fewer drops, ACKs and retransmissions): in the scaling lab (0.5 Mbit/s links, no averaging) 2
and 3 per stage went from 1.89x and 2.67x the tokens/s of 1 per stage to 1.97x and 2.76x. The floor
keeps a little traffic, and the latency estimates, on the other replicas, and a banned replica leaves
the layout at once (the others take its slot).
The replica's advertised queue is not used: it is up to a record period old, and every caller reads
the same value, so callers that trusted it all piled onto the replica that looked idle; a caller's
own in-flight count is exact, and each caller spreading its own tasks spreads everyone's. A failed replica is
banned for base * 2^(failures-1) seconds (failures during a ban do not count: they are the same
outage), capped at ban_max_s (the exponent is capped too, so the
arithmetic cannot overflow however often a replica fails). A banned replica is never chosen: when
every replica of a stage is banned, `choose` returns None and `next_unban_in` says how long the
caller should wait for the first ban to end. A stage is never given up (the replica whose ban ends
first is usable again then), and a dead last replica is retried at growing intervals, not in a loop.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

MAX_BAN_EXPONENT = 30  # 2**30 s is far beyond any sane ban_max_s; keeps 2**n a small float
BAN_BASE_S, BAN_MAX_S = 1.0, 60.0  # a failed replica's first ban, and the longest (node/settings.py RouteSettings)
RELAY_PENALTY = 2.0    # a relayed replica's expected seconds per task are multiplied by this
SLOT_FLOOR = 0.01      # weight factor of a replica outside this caller's slot (one inside: up to 1 + this)
# A caller counts in the slots while it was in a record read this recently, so one read that misses it
# does not move every slot. Such reads were common in the scaling lab until the DHT's caches were
# turned off (node/dht.py NO_CACHE: a cached copy of an earlier answer missed later records): trainers
# that lost each other sent 25-34% of their calls outside their slots. A DHT read can still miss a
# record (a holder that missed a store).
CALLER_MEMORY_S = 60.0


@dataclass
class Replica:
    peer_id: str
    stage: int
    throughput: float = 1.0       # advertised microbatches per second
    queue: int = 0                # advertised queue length
    step: int = -1
    inflight: int = 0             # tasks this node has sent and not yet seen answered
    ema_seconds: float | None = None
    failures: int = 0
    banned_until: float = 0.0
    started: float | None = None  # when the replica's process started (from its record)
    relayed: bool = False         # reachable only through a relay: every hop crosses it twice

    def expected_seconds(self) -> float:
        seconds = self.ema_seconds if self.ema_seconds is not None else 1.0 / max(self.throughput, 1e-3)
        return seconds * RELAY_PENALTY if self.relayed else seconds

    def finish_time(self) -> float:
        return (self.inflight + 1) * self.expected_seconds()


def slot_shares(me: str, callers, replicas) -> dict[str, float]:
    """The share of caller `me`'s calls each of `replicas` gets when the callers (`me` among them) split
    them in contiguous slots: caller r of n (in peer-id order) takes [r/n, (r+1)/n), replica j of m holds
    [j/m, (j+1)/m); a share is the overlap times n. My shares sum to 1; every replica's shares summed over
    all callers are n/m."""
    callers, replicas = sorted(set(callers) | {me}), sorted(replicas)
    n, m, r = len(callers), len(replicas), callers.index(me)
    return {p: n * max(0.0, min((r + 1) / n, (j + 1) / m) - max(r / n, j / m)) for j, p in enumerate(replicas)}


class Router:
    def __init__(self, n_stages: int, *, me: str | None = None, ban_base_s: float = BAN_BASE_S,
                 ban_max_s: float = BAN_MAX_S, ema: float = 0.3, rng: random.Random | None = None,
                 clock=time.monotonic):
        self.n_stages, self.me = n_stages, me
        self.ban_base_s, self.ban_max_s, self.ema = ban_base_s, ban_max_s, ema
        self.rng = rng or random.Random()
        self.clock = clock
        self.stages: dict[int, dict[str, Replica]] = {k: {} for k in range(n_stages)}
        self.seen: dict[int, dict[str, float]] = {k: {} for k in range(n_stages)}  # peer -> last read in a record

    def update(self, stage: int, records: list[dict]) -> None:
        """Replace the known replicas of `stage` with fresh DHT records, keeping what we observed."""
        old = self.stages[stage]
        now, seen = self.clock(), self.seen[stage]
        seen.update((rec["peer_id"], now) for rec in records)
        for peer in [p for p, t in seen.items() if now - t > CALLER_MEMORY_S]:
            del seen[peer]
        fresh = {}
        for rec in records:
            rep = old.get(rec["peer_id"]) or Replica(peer_id=rec["peer_id"], stage=stage)
            if rep.started is not None and rec.get("started", rep.started) != rep.started:
                rep.failures, rep.banned_until = 0, 0.0  # restarted (same identity): a new process, no ban
            rep.started = rec.get("started", rep.started)
            rep.throughput, rep.queue, rep.step = rec.get("throughput", 1.0), rec.get("queue", 0), rec.get("step", -1)
            rep.relayed = bool(rec.get("relayed", False))
            fresh[rep.peer_id] = rep
        for peer, rep in old.items():  # keep in-flight bookkeeping of replicas that vanished mid-call
            if peer not in fresh and rep.inflight:
                fresh[peer] = rep
        self.stages[stage] = fresh

    def is_banned(self, rep: Replica) -> bool:
        return rep.banned_until > self.clock()

    def choose(self, stage: int, exclude=()) -> Replica | None:
        """A replica of `stage` neither banned nor in `exclude`, drawn with probability proportional to
        (its share of this caller's slot + SLOT_FLOOR) / its expected finish time; None if there is none
        (see `next_unban_in` for how long to wait)."""
        usable = [r for r in self.stages[stage].values() if r.peer_id not in exclude and not self.is_banned(r)]
        if not usable:
            return None
        slot = self.slot(stage, [r.peer_id for r in usable])
        weights = [(slot.get(r.peer_id, 0.0) + SLOT_FLOOR) / max(r.finish_time(), 1e-9) for r in usable]
        return self.rng.choices(usable, weights=weights)[0]

    def slot(self, stage: int, peers: list[str]) -> dict[str, float]:
        """This caller's shares of `peers` (replicas of `stage`), by slot_shares among the replicas of
        the stage before it seen in the last CALLER_MEMORY_S; equal shares if this caller does not know
        its own peer id."""
        if self.me is None or stage < 1:
            return dict.fromkeys(peers, 1.0)
        return slot_shares(self.me, self.seen[stage - 1], peers)

    def started(self, rep: Replica) -> None:
        rep.inflight += 1

    def succeeded(self, rep: Replica, seconds: float) -> None:
        rep.inflight = max(0, rep.inflight - 1)
        rep.failures = 0
        rep.ema_seconds = seconds if rep.ema_seconds is None else (1 - self.ema) * rep.ema_seconds + self.ema * seconds

    def failed(self, rep: Replica) -> float:
        """Record a failure and ban the replica; returns the ban duration in seconds (what is left of
        it for a failure during a ban: calls that were in flight together fail together, and one outage
        is one failure; measured: 8 calls failing at once on a dial that libp2p then held in its dial
        backoff escalated a 1 s ban to 60 s within a second, and the trainer stood still for 63 s)."""
        rep.inflight = max(0, rep.inflight - 1)
        if self.is_banned(rep):
            return rep.banned_until - self.clock()
        rep.failures += 1
        exponent = min(rep.failures - 1, MAX_BAN_EXPONENT)
        duration = min(self.ban_base_s * math.ldexp(1.0, exponent), self.ban_max_s)
        rep.banned_until = self.clock() + duration
        return duration

    def next_unban_in(self, stage: int) -> float | None:
        """Seconds until some replica of `stage` may be chosen: 0.0 if one is usable now, None if the
        stage has no replica at all (wait for one to appear in the DHT)."""
        reps = self.stages[stage].values()
        if not reps:
            return None
        return max(0.0, min(r.banned_until for r in reps) - self.clock())
