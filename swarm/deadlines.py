"""Deadlines that shrink along the route, so an upstream caller never gives up before its downstream.

A train request carries `timeout_s`, the time its caller will still wait, relative (peers' clocks
differ; a relative budget needs none to agree). The receiver starts its own Deadline at arrival,
less a transit margin. Before calling the next hop it keeps back what it needs after the reply (its
own backward and its reply's transit), and gives the rest to the child. Every child deadline thus
ends strictly before its parent's: the downstream hop times out, the upstream one still has time
to reroute or to answer "deadline" itself. Retries at a hop back off exponentially, and only start
when enough time is left for the rest of the route.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class HopCosts:
    """What a hop keeps back from its budget (seconds): transit of a message either way, and its own
    backward after the downstream reply. `min_chain_s`: the least time the rest of the route needs
    (downstream forwards + backwards, measured); below it a call is not worth starting."""
    transit_s: float        # node/settings.py RouteSettings.transit_s
    backward_s: float = 0.1
    min_chain_s: float = 0.0

    @property
    def reserve_s(self) -> float:
        return self.backward_s + self.transit_s


class Deadline:
    def __init__(self, timeout_s: float, clock=time.monotonic, transit_s: float = 0.0):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.clock = clock
        self.end = clock() + timeout_s - transit_s

    def remaining(self) -> float:
        return max(0.0, self.end - self.clock())

    def child_timeout(self, costs: HopCosts) -> float | None:
        """`timeout_s` for the next hop's request, or None when what is left cannot cover the rest of
        the route and this hop's own reserve (answer "deadline" instead of starting a doomed call)."""
        budget = self.remaining() - costs.reserve_s
        if budget <= 0.0 or budget < costs.min_chain_s:
            return None
        return budget

    def may_retry(self, backoff_s: float, costs: HopCosts) -> bool:
        """Is a new attempt after sleeping `backoff_s` still able to get a useful child budget?"""
        budget = self.remaining() - backoff_s - costs.reserve_s
        return budget > 0.0 and budget >= costs.min_chain_s


RETRY_BASE_S, RETRY_CAP_S = 0.05, 2.0  # a hop's first retry backoff, and the longest (node/settings.py RouteSettings)


def backoff_s(attempt: int, base_s: float = RETRY_BASE_S, cap_s: float = RETRY_CAP_S) -> float:
    """Sleep before retry number `attempt` (1, 2, ...) at one hop: base * 2^(attempt-1), capped.
    The first retry goes to another replica almost at once; only repeated failures slow down."""
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    return min(base_s * 2 ** (attempt - 1), cap_s)


def route_timeout(hop_seconds, *, transit_s: float, slack: float = 3.0, floor_s: float = 5.0) -> float:
    """The trainer's budget for a whole microbatch: the expected forward+backward seconds of every
    later stage times `slack` (room for one reroute and for queueing), plus two transits per hop."""
    hops = list(hop_seconds)
    if any(h < 0 for h in hops):
        raise ValueError("hop seconds must be >= 0")
    return max(floor_s, slack * sum(hops) + 2 * transit_s * len(hops))
