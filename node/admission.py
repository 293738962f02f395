"""Who gets a stage's compute and state when many ask at once.

Everything a stranger can ask for is capped, per peer and globally (a ban costs an attacker only a
fresh identity, so per-peer limits alone do not hold):
- compute calls (forward, train): the run's trainers are never queued behind strangers;
  others get at most `per_peer` calls in flight each and `strangers` in all. Beyond that the call
  is refused at once with reason `busy` (the caller retries later or elsewhere), so a flood never
  piles up requests in memory or in the compute queue;
- `state` downloads: one at a time per peer, `joiners` at once for peers whose own record says they
  are joining this stage, and `state_others` at once for everyone else.
Every request is at most 4 MiB (the p2p daemon's message limit), so together these bound the
memory a node holds for other peers' requests.
"""
from __future__ import annotations

import contextlib
import time

from protocol.errors import PayloadError

COMPUTE = ("forward", "train")
# Defaults of the caps (node/settings.py ServeSettings): strangers' compute calls in flight in all, state
# downloads at once for joiners of this stage and for anyone else; a peer is refused BAD_PEER_BAN_S after
# BAD_REQUESTS bad requests within BAD_WINDOW_S.
STRANGERS, JOINERS, STATE_OTHERS = 32, 4, 2
BAD_REQUESTS, BAD_WINDOW_S, BAD_PEER_BAN_S = 20, 60.0, 120.0


class Admission:
    def __init__(self, trainers=(), *, per_peer: int = 12, strangers: int = STRANGERS, joiners: int = JOINERS,
                 state_others: int = STATE_OTHERS):
        self.trainers = set(trainers)
        self.per_peer, self.strangers = per_peer, strangers
        self.joiners_cap, self.state_others = joiners, state_others
        self.joining: set[str] = set()       # peers whose records say they are loading this stage
        self.inflight: dict[tuple[str, str], int] = {}
        self.totals = {"compute": 0, "state_joiners": 0, "state_others": 0}

    def set_joining(self, peers: set[str]) -> None:
        """The peers whose records say they are loading this stage (node/announce.py watch_swarm)."""
        self.joining = set(peers)

    def _pool(self, method: str, peer: str) -> tuple[str, int, int] | None:
        """(pool, per-peer cap, pool cap) for this call, or None when it is not capped."""
        if method in COMPUTE:
            return None if peer in self.trainers else ("compute", self.per_peer, self.strangers)
        if method == "state":
            if peer in self.joining:
                return "state_joiners", 1, self.joiners_cap
            return "state_others", 1, self.state_others
        return None

    @contextlib.contextmanager
    def slot(self, method: str, peer: str):
        pool = self._pool(method, peer)
        if pool is None:
            yield
            return
        name, per_peer, cap = pool
        key = (name, peer)
        if self.inflight.get(key, 0) >= per_peer:
            raise PayloadError("busy", f"you already have {per_peer} {method} call(s) in flight here; wait for "
                                       f"them before sending more")
        if self.totals[name] >= cap:
            raise PayloadError("busy", f"this stage is serving {cap} {method} call(s) for other peers; try again "
                                       f"in a moment or another replica")
        self.inflight[key] = self.inflight.get(key, 0) + 1
        self.totals[name] += 1
        try:
            yield
        finally:
            self.totals[name] -= 1
            left = self.inflight[key] - 1
            if left:
                self.inflight[key] = left
            else:
                del self.inflight[key]


class BadPeerTracker:
    """Refuse a peer for `ban_s` seconds after `limit` rejected requests within `window_s`."""

    def __init__(self, limit: int = BAD_REQUESTS, window_s: float = BAD_WINDOW_S, ban_s: float = BAD_PEER_BAN_S):
        self.limit, self.window_s, self.ban_s = limit, window_s, ban_s
        self.events: dict[str, list[float]] = {}
        self.banned: dict[str, float] = {}

    def record(self, peer: str) -> bool:
        now = time.monotonic()
        if len(self.events) > 4096:  # many peer ids: forget the ones with no recent event (bounded memory)
            self.events = {p: ts for p, ts in self.events.items() if ts and now - ts[-1] < self.window_s}
            self.banned = {p: until for p, until in self.banned.items() if until > now}
        recent = [t for t in self.events.get(peer, []) if now - t < self.window_s] + [now]
        self.events[peer] = recent
        if len(recent) >= self.limit:
            self.banned[peer] = now + self.ban_s
            self.events.pop(peer)
            return True
        return False

    def is_banned(self, peer: str) -> bool:
        until = self.banned.get(peer)
        if until is None:
            return False
        if until < time.monotonic():
            del self.banned[peer]
            return False
        return True
