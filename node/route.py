"""The next hop of a microbatch's route: one place that picks a replica of the next stage, calls it,
counts the bytes of every message, and reroutes when it fails (Petals' sequence manager, per hop).

Every node that sends codes on -- a trainer to stage 1, stage k to stage k+1 -- owns one NextHop
with its own Router, fed by DHT records and by its own latency observations. A failed replica is
banned (growing bans) and the call moves to another replica of the same stage, with backoff, as long
as the request's deadline leaves time for the rest of the route (swarm/deadlines.py) and some
replica of the stage is not banned; otherwise the hop gives up at once and says so upstream
("downstream": a later stage failed, not the replica we called), so a trainer learns within a
second that a stage has no usable replica, pauses, and tries again itself.
"""
from __future__ import annotations

import asyncio
import logging
import time

from node.announce import RecordView
from node.client import StageClient
from node.settings import RouteSettings
from protocol.errors import NoRoute, PeerUnavailable, RemoteError
from swarm.deadlines import Deadline, HopCosts, backoff_s
from swarm.routing import Router

log = logging.getLogger(__name__)

# Reasons a replica gives that say "not me, try another" rather than "your request is wrong".
RETRYABLE = {"internal", "busy", "deadline", "unavailable"}


class NextHop:
    """Calls to stage `stage`, routed by the node's RecordView (shared with its server and trainer)
    and by this hop's own observations of the replicas."""

    def __init__(self, stage: int, run, view: RecordView, p2p, metrics, count=None,
                 settings: RouteSettings = RouteSettings(), me: str | None = None):
        self.stage, self.run, self.view, self.metrics, self.settings = stage, run, view, metrics, settings
        self.client = StageClient(p2p, run)
        self.count = count or (lambda direction, n: None)   # the node's own byte counter
        # `me`: our peer id, our place in the slots the callers of `stage` split its replicas in (swarm/routing.py)
        self.router = Router(run.model.n_stages, me=me, ban_base_s=settings.ban_base_s, ban_max_s=settings.ban_max_s)
        self.bytes = {"fwd": 0, "bwd": 0}         # whole messages across our boundary (stage-1 .. stage)
        self.codes = {"fwd": 0, "bwd": 0}         # of which codec bytes of codes, gradients and token ids
        self.tokens = 0
        self.retries = 0
        self.calls: dict[str, int] = {}           # train calls each replica answered: how ours split
        self._routed = -1                         # the view's read the router was last updated from

    # --- records -------------------------------------------------------------------------------
    async def refresh(self, force: bool = False) -> None:
        """The view's refresh (see RecordView), and the router updated from what it read."""
        await self.view.refresh(force)
        self._update_router()

    def _update_router(self) -> None:
        if self._routed != self.view.reads:
            self._routed = self.view.reads
            for k in range(self.run.model.n_stages):
                self.router.update(k, self.view.records.get(k, []))

    # --- one call ------------------------------------------------------------------------------
    async def call(self, deadline: Deadline, tokens: int, reserve_s: float = 0.0, **fields) -> tuple[dict, str]:
        """`train` on some replica of the next stage before `deadline`, keeping `reserve_s` (our own
        backward) back. Returns (reply, peer id that answered); raises NoRoute, or RemoteError when
        the replica says our request itself is wrong."""
        costs = HopCosts(transit_s=self.settings.transit_s, backward_s=reserve_s)
        tried: set[str] = set()
        attempt, patience = 0, [self.settings.patience_s]
        while True:
            rep = await self._pick(tried, deadline, costs, patience)
            timeout = deadline.child_timeout(costs)
            if timeout is None:
                raise NoRoute("deadline", f"no time left for stage {self.stage}")
            self.router.started(rep)
            t0 = time.perf_counter()
            try:
                reply, sent, received = await self.client.call(rep.peer_id, self.stage, "train", timeout=timeout,
                                                               timeout_s=timeout, **fields)
                self._check_route(reply, rep.peer_id)
            except (RemoteError, PeerUnavailable) as e:
                if isinstance(e, RemoteError) and e.reason not in RETRYABLE:
                    self.router.succeeded(rep, time.perf_counter() - t0)
                    if e.reason == "downstream":  # the replica is fine; its next hop had no usable replica
                        raise NoRoute("downstream", str(e)) from e
                    raise
                attempt += 1
                await self._failed(rep, e, tried)
                wait = backoff_s(attempt, self.settings.retry_base_s, self.settings.retry_cap_s) if attempt > 1 else 0.0
                if not deadline.may_retry(wait, costs):
                    raise NoRoute("deadline", f"stage {self.stage}: {e}") from e
                await asyncio.sleep(wait)
                continue
            seconds = time.perf_counter() - t0
            self.router.succeeded(rep, seconds)
            self.metrics.call_seconds.labels(str(self.stage), "train").observe(seconds)
            if not fields.get("eval"):
                self._count(reply, sent, received, tokens)
                self.calls[rep.peer_id] = self.calls.get(rep.peer_id, 0) + 1
                self.metrics.next_hop_calls.labels(rep.peer_id).inc()
            return reply, rep.peer_id

    def _check_route(self, reply: dict, peer: str) -> None:
        """A reply's route names one peer per stage from the one that answered to the tail; a replica
        that lies about it is a bad replica like any other (banned, the call rerouted)."""
        route = reply["route"]
        if len(route) != self.run.model.n_stages - self.stage or route[0] != peer or not all(route):
            raise RemoteError("internal", f"bad reply to train: route {route!r} does not lead from {peer} to the tail")

    async def _pick(self, tried: set, deadline: Deadline, costs: HopCosts, patience: list):
        """A replica not banned and not tried in this call. When every replica is banned, wait for the
        first ban to end only while this call's patience (a few seconds, for a transient refusal)
        lasts; then NoRoute: the trainer pauses and retries later, rather than every hop of the route
        waiting out the bans of a dead replica."""
        while True:
            await self.refresh()
            rep = self.router.choose(self.stage, exclude=tried)
            if rep is None and tried:
                tried.clear()  # every replica failed once: start over with the ones not banned
                rep = self.router.choose(self.stage)
            if rep is not None:
                return rep
            wait = self.router.next_unban_in(self.stage)
            pause = max(wait, 0.05) if wait is not None else 0.5
            if pause > patience[0] or not deadline.may_retry(pause, costs):
                raise NoRoute("unavailable", f"no usable replica of stage {self.stage} "
                                             f"({len(self.router.stages[self.stage])} known)")
            patience[0] -= pause
            await asyncio.sleep(pause)
            await self.refresh(force=True)

    async def _failed(self, rep, e: Exception, tried: set) -> None:
        ban = self.router.failed(rep)
        tried.add(rep.peer_id)
        self.retries += 1
        self.metrics.retries.labels(str(self.stage)).inc()
        self.metrics.bans.labels(str(self.stage)).inc()
        log.warning("stage %d replica %s failed (%s); banned %.0fs, rerouting", self.stage, rep.peer_id[-8:], e, ban)
        await self.view.read_quietly(fresh=True)
        self._update_router()

    def _count(self, reply: dict, sent: int, received: int, tokens: int) -> None:
        """Our request crossed boundary stage-1 forward, its reply the same boundary backward: every
        byte of both messages, counted once, by the caller."""
        boundary = self.stage - 1
        self.count("sent", sent)
        self.count("received", received)
        self.tokens += tokens
        for n, codes, direction, pass_ in ((sent, reply["payload"][0], "sent", "forward"),
                                           (received, reply["payload"][1], "received", "backward")):
            key = "fwd" if pass_ == "forward" else "bwd"
            self.bytes[key] += n
            self.codes[key] += codes
            self.metrics.count_boundary(n, codes, boundary, direction, pass_, tokens, self.run.model.d_model)
