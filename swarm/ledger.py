"""Exactly-once gradients without a head: microbatch keys, trainers' ledgers, and the step's apply plan.

A microbatch is named by its key (owner trainer peer id, step, micro). Its route is the replica
that served it on every stage, stage 0 being the owner itself; the route comes back with the
gradient, so each trainer's ledger maps its finished micros to their routes. At the step barrier
the step coordinator merges the ledgers of the live trainers into one ApplyPlan: for every
(stage, replica), exactly the keys it must apply, plus the number of keys the step applies in all
(each replica divides its summed gradients by it). Everything a replica holds and the plan does
not list for it -- a dead trainer's keys, an abandoned route after a reroute, a duplicate slot --
is discarded. Pure data: no network, no torch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple

import msgpack


class LedgerError(ValueError):
    """A ledger or plan that breaks the rules (wrong step, bad route, malformed wire form)."""


class MicroKey(NamedTuple):
    owner: str   # the trainer's peer id (base58)
    step: int
    micro: int   # the global slot of the step's batch (swarm/shards.py), not a per-trainer index

    def to_wire(self) -> list:
        return [self.owner, self.step, self.micro]

    @classmethod
    def from_wire(cls, value) -> "MicroKey":
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[0], str) and value[0]
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value[1:])):
            raise LedgerError(f"a microbatch key is [owner peer id, step >= 0, micro >= 0], got {value!r}")
        return cls(value[0], value[1], value[2])


Route = tuple  # (peer id of stage 0 = owner, peer id of stage 1, ..., peer id of stage S-1)


def check_route(key: MicroKey, route, n_stages: int) -> Route:
    route = tuple(route) if isinstance(route, (list, tuple)) else None
    if route is None or len(route) != n_stages or not all(isinstance(p, str) and p for p in route):
        raise LedgerError(f"route of {key} must name one peer id per stage ({n_stages}), got {route!r}")
    if route[0] != key.owner:
        raise LedgerError(f"route of {key} starts at {route[0]!r}, not at its owner")
    return route


@dataclass
class TrainerLedger:
    """One trainer's finished microbatches of one step: micro -> route actually taken."""
    owner: str
    step: int
    n_stages: int
    routes: dict = field(default_factory=dict)

    def record(self, micro: int, route) -> None:
        """A microbatch whose gradient came back: the newest route wins (a re-driven key replaces it)."""
        key = MicroKey(self.owner, self.step, micro)
        self.routes[micro] = check_route(key, route, self.n_stages)

    def to_wire(self) -> dict:
        return {"owner": self.owner, "step": self.step, "routes": [[m, list(r)] for m, r in sorted(self.routes.items())]}

    @classmethod
    def from_wire(cls, value, n_stages: int) -> "TrainerLedger":
        if not isinstance(value, dict) or not isinstance(value.get("routes"), list):
            raise LedgerError("a ledger is a map with owner, step and routes")
        owner, step = value.get("owner"), value.get("step")
        MicroKey.from_wire([owner, step, 0])
        ledger = cls(owner, step, n_stages)
        for entry in value["routes"]:
            if not (isinstance(entry, list) and len(entry) == 2):
                raise LedgerError(f"a ledger entry is [micro, route], got {entry!r}")
            micro = MicroKey.from_wire([owner, step, entry[0]]).micro
            if micro in ledger.routes:
                raise LedgerError(f"micro {micro} appears twice in the ledger of {owner}")
            ledger.record(micro, entry[1])
        return ledger


@dataclass(frozen=True)
class ApplyPlan:
    step: int
    keys: tuple                 # every key the step applies, sorted
    apply: dict                 # (stage, peer id) -> sorted tuple of keys that replica applies
    dropped: tuple = ()         # (key, reason) of keys reported but not applied

    @property
    def n_total(self) -> int:
        """Keys applied on every stage: each replica scales its summed gradient by 1/n_total."""
        return len(self.keys)

    def keys_for(self, stage: int, peer: str) -> tuple:
        return self.apply.get((stage, peer), ())

    def digest(self) -> str:
        """Same plan, same digest, whoever computed it (a coordinator that takes over compares)."""
        return hashlib.sha256(pack_plan(self)).hexdigest()[:16]


def merge_ledgers(step: int, ledgers, live_owners, n_stages: int) -> ApplyPlan:
    """The step's apply plan from the trainers' ledgers.

    Only ledgers of `live_owners` count (a dead trainer's keys are dropped everywhere). If two
    trainers fed the same slot (their rosters disagreed), the lowest owner id keeps it and the
    other's key is dropped, so no sequence of the batch is counted twice."""
    live = set(live_owners)
    chosen: dict[int, tuple[MicroKey, Route]] = {}
    dropped = []
    for ledger in sorted(ledgers, key=lambda g: g.owner):
        if ledger.step != step:
            raise LedgerError(f"ledger of {ledger.owner} is for step {ledger.step}, not {step}")
        for micro, route in sorted(ledger.routes.items()):
            key = MicroKey(ledger.owner, step, micro)
            check_route(key, route, n_stages)
            if ledger.owner not in live:
                dropped.append((key, "owner gone"))
            elif micro in chosen:
                dropped.append((key, f"slot {micro} already fed by {chosen[micro][0].owner}"))
            else:
                chosen[micro] = (key, route)
    apply: dict[tuple[int, str], list] = {}
    for key, route in chosen.values():
        for stage, peer in enumerate(route):
            apply.setdefault((stage, peer), []).append(key)
    return ApplyPlan(step, tuple(sorted(k for k, _ in chosen.values())),
                     {rp: tuple(sorted(keys)) for rp, keys in sorted(apply.items())}, tuple(sorted(dropped)))


def without_keys(plan: ApplyPlan, lost, reason: str) -> ApplyPlan:
    """The plan minus `lost` keys on every stage (an owner died before the step was applied)."""
    lost = set(lost)
    apply = {rp: tuple(k for k in keys if k not in lost) for rp, keys in plan.apply.items()}
    return ApplyPlan(plan.step, tuple(k for k in plan.keys if k not in lost),
                     {rp: keys for rp, keys in apply.items() if keys},
                     tuple(sorted(plan.dropped + tuple((k, reason) for k in lost if k in plan.keys))))


@dataclass(frozen=True)
class ReplicaVerdict:
    apply: tuple     # keys to sum and apply
    discard: tuple   # keys held here that the plan does not list for this replica
    missing: tuple   # keys listed for this replica that it does not hold (it restarted, or lost them)


def replica_verdict(plan: ApplyPlan, stage: int, peer: str, held) -> ReplicaVerdict:
    """What one replica does with the keys it holds for the plan's step."""
    held = {k for k in held if k.step == plan.step}
    listed = set(plan.keys_for(stage, peer))
    return ReplicaVerdict(tuple(sorted(listed & held)), tuple(sorted(held - listed)), tuple(sorted(listed - held)))


def stale_keys(held, applied_step: int) -> tuple:
    """Keys of steps already applied here: left over by a route that finished after the barrier."""
    return tuple(sorted(k for k in held if k.step <= applied_step))


def pack_plan(plan: ApplyPlan) -> bytes:
    """The plan's wire form (msgpack): what the coordinator sends to trainers and replicas."""
    index = {k: i for i, k in enumerate(plan.keys)}
    return msgpack.packb({"step": plan.step, "keys": [k.to_wire() for k in plan.keys],
                          "apply": [[s, p, [index[k] for k in keys]] for (s, p), keys in plan.apply.items()],
                          "dropped": [[k.to_wire(), r] for k, r in plan.dropped]}, use_bin_type=True)


def unpack_plan(data: bytes, n_stages: int) -> ApplyPlan:
    try:
        raw = msgpack.unpackb(data, raw=False)
        step, keys = raw["step"], tuple(MicroKey.from_wire(k) for k in raw["keys"])
        if type(step) is not int or step < 0:
            raise LedgerError(f"plan step must be an int >= 0, got {step!r}")
        apply = {}
        for stage, peer, idx in raw["apply"]:
            if not (type(stage) is int and 0 <= stage < n_stages and isinstance(peer, str) and peer):
                raise LedgerError(f"bad replica ({stage!r}, {peer!r}) in plan")
            if not all(type(i) is int and 0 <= i < len(keys) for i in idx):
                raise LedgerError(f"plan entry of ({stage}, {peer}) points outside its key list")
            apply[(stage, peer)] = tuple(keys[i] for i in idx)
        dropped = tuple((MicroKey.from_wire(k), str(r)) for k, r in raw["dropped"])
    except LedgerError:
        raise
    except Exception as e:  # msgpack errors, missing fields, bad indexes: all "malformed"
        raise LedgerError(f"malformed plan ({type(e).__name__}: {e})") from e
    if any(k.step != step for k in keys):
        raise LedgerError(f"plan for step {step} lists keys of another step")
    return ApplyPlan(step, keys, apply, dropped)
