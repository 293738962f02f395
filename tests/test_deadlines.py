"""Deadlines shrink along the route: a downstream hop always gives up before its caller."""
import pytest

from swarm.deadlines import Deadline, HopCosts, backoff_s, route_timeout


def chain_costs(hop_seconds, backward_share: float = 0.6, transit_s: float = 0.5) -> list[HopCosts]:
    """HopCosts for stages 0..S-2 from the expected fwd+bwd seconds of stages 1..S-1 and the caller's
    own seconds (hop_seconds[0] is stage 0's): stage k keeps back its backward, and needs the rest
    of the route (stages k+1..S-1) to fit in what it hands down."""
    hops = list(hop_seconds)
    return [HopCosts(transit_s=transit_s, backward_s=backward_share * hops[k],
                     min_chain_s=sum(hops[k + 1:]) + 2 * transit_s * (len(hops) - k - 2))
            for k in range(len(hops) - 1)]


def expired(deadline: Deadline) -> bool:
    return deadline.remaining() <= 0.0


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_child_deadlines_end_strictly_before_their_parents():
    clock = Clock()
    hops = [0.2, 0.3, 0.3, 0.4]                     # expected fwd+bwd seconds of stages 0..3
    costs = chain_costs(hops, transit_s=0.1)
    timeout = route_timeout(hops[1:], transit_s=0.1)
    ends = []
    deadline = Deadline(timeout, clock)
    for k, c in enumerate(costs):
        ends.append(deadline.end)
        child = deadline.child_timeout(c)
        assert child is not None, f"stage {k} had no budget for the rest of the route"
        clock.t += 0.05                              # the request travels
        deadline = Deadline(child, clock, transit_s=0.01)
    ends.append(deadline.end)
    assert all(b < a for a, b in zip(ends, ends[1:]))
    assert ends[-1] > clock.t                        # the tail still has time to compute


def test_no_child_call_when_the_rest_of_the_route_cannot_fit():
    clock = Clock()
    d = Deadline(1.0, clock)
    costs = HopCosts(transit_s=0.1, backward_s=0.2, min_chain_s=0.5)
    assert d.child_timeout(costs) == pytest.approx(0.7)
    clock.t += 0.3
    assert d.child_timeout(costs) is None            # 0.4 left for a chain that needs 0.5
    clock.t += 1.0
    assert expired(d) and d.remaining() == 0.0


def test_retry_only_if_the_backoff_leaves_a_useful_budget():
    clock = Clock()
    d = Deadline(2.0, clock)
    costs = HopCosts(transit_s=0.1, backward_s=0.1, min_chain_s=1.0)
    assert d.may_retry(backoff_s(1), costs)
    assert not d.may_retry(1.0, costs)


def test_backoff_doubles_and_is_capped():
    assert [backoff_s(n, 0.05, 0.3) for n in (1, 2, 3, 4, 5)] == [0.05, 0.1, 0.2, 0.3, 0.3]
    with pytest.raises(ValueError):
        backoff_s(0)


def test_route_timeout_and_bad_input():
    assert route_timeout([1.0, 1.0], slack=3.0, transit_s=0.5) == 8.0
    assert route_timeout([0.01], floor_s=5.0, transit_s=0.2) == 5.0
    with pytest.raises(ValueError):
        route_timeout([-1.0], transit_s=0.2)
    with pytest.raises(ValueError):
        Deadline(0.0)
