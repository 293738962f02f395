"""Exactly-once bookkeeping: ledgers merge into one apply plan; everything else is discarded."""
import msgpack
import pytest

from swarm.ledger import (LedgerError, MicroKey, TrainerLedger, merge_ledgers, pack_plan, replica_verdict,
                          stale_keys, unpack_plan, without_keys)

S = 3


def ledger(owner, step, routes):
    g = TrainerLedger(owner, step, S)
    for micro, route in routes.items():
        g.record(micro, route)
    return g


def two_trainers(step=5):
    a = ledger("A", step, {0: ("A", "m1", "t1"), 2: ("A", "m2", "t1")})
    b = ledger("B", step, {1: ("B", "m1", "t2"), 3: ("B", "m2", "t2")})
    return a, b


def test_plan_lists_each_key_once_on_exactly_the_replicas_of_its_route():
    plan = merge_ledgers(5, two_trainers(), live_owners={"A", "B"}, n_stages=S)
    assert plan.n_total == 4
    assert plan.keys_for(0, "A") == (MicroKey("A", 5, 0), MicroKey("A", 5, 2))
    assert plan.keys_for(1, "m1") == (MicroKey("A", 5, 0), MicroKey("B", 5, 1))
    assert plan.keys_for(2, "t2") == (MicroKey("B", 5, 1), MicroKey("B", 5, 3))
    assert plan.keys_for(1, "t1") == ()
    for stage in range(S):  # every stage applies every key exactly once, summed over its replicas
        applied = [k for (s, _), keys in plan.apply.items() if s == stage for k in keys]
        assert sorted(applied) == list(plan.keys)
    assert plan.dropped == ()


def test_dead_trainer_keys_are_dropped_on_every_stage():
    plan = merge_ledgers(5, two_trainers(), live_owners={"A"}, n_stages=S)
    assert plan.n_total == 2 and all(k.owner == "A" for k in plan.keys)
    assert plan.keys_for(2, "t2") == () and plan.keys_for(0, "B") == ()
    assert [r for _, r in plan.dropped] == ["owner gone", "owner gone"]
    # m1 held A's micro 0 and B's micro 1: it applies the first, discards the second
    held = {MicroKey("A", 5, 0), MicroKey("B", 5, 1)}
    verdict = replica_verdict(plan, 1, "m1", held)
    assert verdict.apply == (MicroKey("A", 5, 0),) and verdict.discard == (MicroKey("B", 5, 1),)
    assert verdict.missing == ()


def test_rerouted_key_is_applied_only_on_the_final_route():
    g = TrainerLedger("A", 0, S)
    g.record(0, ("A", "m1", "t1"))   # first attempt (its gradient came back, then the key was re-driven)
    g.record(0, ("A", "m2", "t2"))   # the newest route wins
    plan = merge_ledgers(0, [g], {"A"}, S)
    held_by_old_tail = {MicroKey("A", 0, 0)}
    assert replica_verdict(plan, 2, "t1", held_by_old_tail).discard == (MicroKey("A", 0, 0),)
    assert replica_verdict(plan, 2, "t2", set()).missing == (MicroKey("A", 0, 0),)


def test_duplicate_slot_is_kept_by_lowest_owner():
    a = ledger("A", 1, {0: ("A", "m1", "t1")})
    b = ledger("B", 1, {0: ("B", "m1", "t1"), 1: ("B", "m1", "t1")})
    plan = merge_ledgers(1, [b, a], {"A", "B"}, S)
    assert plan.keys == (MicroKey("A", 1, 0), MicroKey("B", 1, 1))
    assert plan.dropped == ((MicroKey("B", 1, 0), "slot 0 already fed by A"),)


def test_without_keys_removes_an_owner_that_died_before_the_step():
    plan = merge_ledgers(5, two_trainers(), {"A", "B"}, S)
    smaller = without_keys(plan, [k for k in plan.keys if k.owner == "B"], "owner died before apply")
    assert smaller.n_total == 2 and (2, "t2") not in smaller.apply
    assert smaller.apply[(1, "m1")] == (MicroKey("A", 5, 0),)
    assert len(smaller.dropped) == 2


def test_plan_round_trips_and_digest_is_stable():
    plan = merge_ledgers(5, two_trainers(), {"A"}, S)
    again = unpack_plan(pack_plan(plan), S)
    assert again == plan and again.digest() == plan.digest()
    other = merge_ledgers(5, two_trainers(), {"A", "B"}, S)
    assert other.digest() != plan.digest()


def test_ledger_wire_round_trip():
    a, _ = two_trainers()
    assert TrainerLedger.from_wire(a.to_wire(), S) == a


@pytest.mark.parametrize("bad", [
    {"owner": "A", "step": 1, "routes": [[0, ["B", "m", "t"]]]},          # route not starting at its owner
    {"owner": "A", "step": 1, "routes": [[0, ["A", "m"]]]},               # one peer per stage
    {"owner": "A", "step": -1, "routes": []},                             # negative step
    {"owner": "", "step": 1, "routes": []},                               # empty owner
    {"owner": "A", "step": 1, "routes": [[0, ["A", "m", "t"]], [0, ["A", "m", "t"]]]},  # micro twice
    {"owner": "A", "step": 1, "routes": [[True, ["A", "m", "t"]]]},       # bool is no micro
    "not a map",
])
def test_malformed_ledgers_are_refused(bad):
    with pytest.raises(LedgerError):
        TrainerLedger.from_wire(bad, S)


def test_ledger_of_another_step_is_refused():
    a, b = two_trainers(step=4)
    with pytest.raises(LedgerError, match="step 4, not 5"):
        merge_ledgers(5, [a, b], {"A", "B"}, S)


BAD_PLANS = [
    b"\x00garbage",
    b"\x80",
    msgpack.packb({"step": 1, "keys": [["A", 1, 0]], "apply": [[0, "A", [5]]], "dropped": []}),  # index out of range
    msgpack.packb({"step": 1, "keys": [["A", 2, 0]], "apply": [], "dropped": []}),           # key of another step
    msgpack.packb({"step": 1, "keys": [], "apply": [[9, "A", []]], "dropped": []}),          # no stage 9
    msgpack.packb({"step": "1", "keys": [], "apply": [], "dropped": []}),                    # step not an int
    msgpack.packb([1, 2, 3]),                                                               # not a map
]


@pytest.mark.parametrize("data", BAD_PLANS)
def test_malformed_plans_are_refused(data):
    with pytest.raises(LedgerError):
        unpack_plan(data, S)


def test_stale_keys_are_those_of_applied_steps():
    held = {MicroKey("A", 3, 0), MicroKey("A", 4, 1), MicroKey("B", 5, 0)}
    assert stale_keys(held, applied_step=4) == (MicroKey("A", 3, 0), MicroKey("A", 4, 1))
