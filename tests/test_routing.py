"""Router bans: bounded arithmetic, no banned replica chosen, and how long to wait when all are."""
import random

import pytest

from swarm.routing import CALLER_MEMORY_S, Router, slot_shares


def replicas(router, stage: int) -> list:
    return list(router.stages[stage].values())


def missing_stages(router) -> list[int]:
    return [k for k, reps in router.stages.items() if k > 0 and not reps]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def router_with(peers, clock, **kw):
    r = Router(2, rng=random.Random(0), clock=clock, **kw)
    r.update(1, [{"peer_id": p, "throughput": 1.0} for p in peers])
    return r


def test_ban_duration_is_capped_and_never_overflows():
    clock = Clock()
    r = router_with(["a"], clock, ban_base_s=1.0, ban_max_s=60.0)
    rep = replicas(r, 1)[0]
    durations = []
    for _ in range(5000):  # the head died at ~1030 failures, each after its ban ended
        durations.append(r.failed(rep))
        clock.t += durations[-1]
    clock.t -= durations[-1]
    assert durations[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(durations) == 60.0 and durations[-1] == 60.0
    assert rep.banned_until == clock.t + 60.0


def test_a_banned_replica_is_never_chosen_and_the_wait_is_reported():
    clock = Clock()
    r = router_with(["a"], clock)
    rep = r.choose(1)
    assert rep.peer_id == "a" and r.next_unban_in(1) == 0.0
    r.failed(rep)  # banned 1 s
    assert r.choose(1) is None
    assert r.next_unban_in(1) == pytest.approx(1.0)
    clock.t += 0.4
    assert r.choose(1) is None and r.next_unban_in(1) == pytest.approx(0.6)
    clock.t += 0.6
    assert r.choose(1).peer_id == "a"


def test_retries_of_a_dead_only_replica_are_spaced_out():
    """Simulate a caller that retries as soon as the ban allows: 20 s of outage -> a handful of calls."""
    clock = Clock()
    r = router_with(["dead"], clock)
    calls, end = 0, clock.t + 20.0
    while clock.t < end:
        rep = r.choose(1)
        if rep is None:
            clock.t += r.next_unban_in(1)
            continue
        calls += 1
        r.failed(rep)
    assert calls <= 6, calls


def test_other_replicas_are_used_while_one_is_banned():
    clock = Clock()
    r = router_with(["a", "b"], clock)
    a = next(x for x in replicas(r, 1) if x.peer_id == "a")
    r.failed(a)
    assert {r.choose(1).peer_id for _ in range(20)} == {"b"}
    assert r.choose(1, exclude={"b"}) is None
    assert r.next_unban_in(1) == 0.0


def test_a_stage_without_records_has_no_wait_to_offer():
    r = Router(3)
    assert r.choose(2) is None and r.next_unban_in(2) is None
    assert missing_stages(r) == [1, 2]


def test_success_resets_the_ban_exponent():
    clock = Clock()
    r = router_with(["a"], clock)
    rep = replicas(r, 1)[0]
    for _ in range(10):
        clock.t += r.failed(rep)
    r.succeeded(rep, 0.1)
    assert r.failed(rep) == 1.0


def test_calls_failing_together_during_a_ban_are_one_failure():
    clock = Clock()
    r = router_with(["a"], clock)
    rep = replicas(r, 1)[0]
    rep.inflight = 8
    assert r.failed(rep) == 1.0  # the first of 8 calls in flight to fail bans it for 1 s
    clock.t += 0.25
    assert [r.failed(rep) for _ in range(7)] == [0.75] * 7  # the other 7: the same outage, no longer
    assert rep.failures == 1 and rep.inflight == 0
    clock.t += 0.75
    assert r.failed(rep) == 2.0  # failing again after the ban ended: the next, longer ban


def test_a_restarted_replica_with_the_same_identity_is_not_banned():
    clock = Clock()
    r = Router(2, clock=clock)
    r.update(1, [{"peer_id": "a", "started": 1.0}])
    rep = replicas(r, 1)[0]
    for _ in range(6):
        r.failed(rep)
    r.update(1, [{"peer_id": "a", "started": 1.0}])  # same process, record refreshed: still banned
    assert r.choose(1) is None
    r.update(1, [{"peer_id": "a", "started": 50.0}])  # same peer id, new process
    assert r.choose(1).peer_id == "a"


def test_a_replica_that_looked_slow_still_gets_its_share():
    """Two trainers, or one whose first call to a replica was slow, must not pile onto the other one:
    shares follow 1 / expected time, so the slow-looking replica is still called and its estimate
    recovers."""
    r = router_with(["a", "b"], Clock())
    a, b = sorted(replicas(r, 1), key=lambda x: x.peer_id)
    r.succeeded(a, 0.1)
    r.succeeded(b, 1.0)                      # one slow first call (connection set-up)
    got = {"a": 0, "b": 0}
    for _ in range(1000):
        got[r.choose(1).peer_id] += 1
    assert 40 < got["b"] < 160, got          # ~1/11 of the calls: a share, not starvation
    for _ in range(5):
        r.succeeded(b, 0.1)                  # its real speed, observed
    assert b.expected_seconds() < 0.3


def test_slots_give_every_replica_the_same_load_and_each_caller_few_replicas():
    for n, m in [(1, 1), (2, 2), (3, 3), (2, 3), (3, 2), (1, 3), (4, 3)]:
        callers, reps = [f"c{i}" for i in range(n)], [f"r{j}" for j in range(m)]
        shares = {c: slot_shares(c, callers, reps) for c in callers}
        for c in callers:
            assert sum(shares[c].values()) == pytest.approx(1.0)
            assert sum(1 for v in shares[c].values() if v > 1e-12) <= -(-m // n) + 1
        for rep in reps:
            assert sum(shares[c][rep] for c in callers) == pytest.approx(n / m)
    # as many callers as replicas: a one-to-one matching
    assert slot_shares("c1", ["c0", "c1"], ["r1", "r0"]) == {"r0": 0.0, "r1": 1.0}
    # a caller missing from the records it read still gets a slot
    assert slot_shares("c9", ["c0"], ["r0", "r1"]) == {"r0": 0.0, "r1": 1.0}


def test_a_caller_sends_mostly_into_its_slot_and_takes_over_when_it_is_banned():
    clock = Clock()
    r = Router(2, me="c0", rng=random.Random(0), clock=clock)
    r.update(0, [{"peer_id": "c0"}, {"peer_id": "c1"}])
    r.update(1, [{"peer_id": p, "throughput": 1.0} for p in ("r0", "r1")])

    def picks(n=400):
        counts = {"r0": 0, "r1": 0}
        for _ in range(n):
            rep = r.choose(1)
            r.started(rep)
            counts[rep.peer_id] += 1
            r.succeeded(rep, 1.0)
        return counts

    home = picks()
    assert home["r0"] >= 0.95 * 400, home  # c0's slot is r0; r1 keeps a trickle
    assert home["r1"] > 0
    # with 8 calls in flight at its slot's replica, the caller still sends most there
    for _ in range(8):
        r.started(r.stages[1]["r0"])
    assert picks()["r0"] > 0.8 * 400
    # its slot's replica banned: everything goes to the other
    r.failed(r.stages[1]["r0"])
    assert picks(50) == {"r0": 0, "r1": 50}
    # without our own id, no slots: calls spread evenly
    even = Router(2, rng=random.Random(0), clock=clock)
    even.update(1, [{"peer_id": p, "throughput": 1.0} for p in ("r0", "r1")])
    counts = {"r0": 0, "r1": 0}
    for _ in range(400):
        counts[even.choose(1).peer_id] += 1
    assert 150 < counts["r0"] < 250


def test_a_caller_missing_from_one_read_keeps_its_slot_for_a_while():
    clock = Clock()
    r = Router(2, me="c0", rng=random.Random(0), clock=clock)
    r.update(1, [{"peer_id": p, "throughput": 1.0} for p in ("r0", "r1")])
    r.update(0, [{"peer_id": "c0"}, {"peer_id": "c1"}])
    clock.t += 10.0
    r.update(0, [{"peer_id": "c0"}])  # a read of our own stage's key that returned only our record
    assert r.slot(1, ["r0", "r1"]) == {"r0": 1.0, "r1": 0.0}
    clock.t += CALLER_MEMORY_S
    r.update(0, [{"peer_id": "c0"}])  # c1 not seen for longer than the memory: it left
    assert r.slot(1, ["r0", "r1"]) == {"r0": 0.5, "r1": 0.5}  # alone: every replica alike
