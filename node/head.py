"""The head (stage 0): owns the data and the first layers, and drives every microbatch through one
replica per later stage, chosen from DHT records, and back for backward.

All microbatches of a step are in flight at once, so every stage works in parallel; the step ends
with a barrier where every replica applies its optimizer update (and averages when due). The head
keeps each boundary's code until the microbatch is done, so a call that fails is retried on another
replica of the same stage.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor

from protocol.codec import decode, encode, encode_ints
from node.announce import read_stage_records
from node.client import PeerUnavailable, RemoteError, StageClient
from swarm.routing import Router
from swarm.stage_worker import StageWorker

log = logging.getLogger(__name__)

# Reasons a replica gives that say "not me, try another" rather than "your request is wrong".
RETRYABLE = {"internal", "state", "busy"}


class StageMissing(RuntimeError):
    pass


class Stopped(RuntimeError):
    """A stop signal arrived while the head was paused waiting for replicas."""


def _pause_line(blocked: dict[int, float | None], waited: float) -> str:
    missing = [k for k, w in sorted(blocked.items()) if w is None]
    banned = [f"{k} (retry in {w:.0f}s)" for k, w in sorted(blocked.items()) if w is not None]
    parts = ([f"a replica of stage(s) {', '.join(map(str, missing))}"] if missing else []) + \
            ([f"banned replicas of stage(s) {', '.join(banned)}"] if banned else [])
    hint = f"; start one with `resbm-node join --stage {missing[0]} ...`" if missing else ""
    return f"paused: waiting for {' and '.join(parts)} ({waited:.0f}s){hint}"


class Head:
    def __init__(self, worker: StageWorker, corpus, dht, p2p, metrics, *, forward_timeout: float = 30.0,
                 backward_timeout: float = 75.0, stall_timeout: float = 600.0, refresh_s: float = 5.0,
                 status=None, executor: ThreadPoolExecutor | None = None, stop: asyncio.Event | None = None,
                 poll_min_s: float = 1.0, poll_max_s: float = 10.0):
        self.worker, self.corpus, self.dht, self.p2p, self.metrics = worker, corpus, dht, p2p, metrics
        self.run, self.cfg = worker.run, worker.run.model
        self.fp = self.run.fingerprint
        self.codec = self.cfg.wire_codec
        self.client = StageClient(p2p, self.run)
        # a restarted head that redoes a step its previous run left half done is told apart by this
        self.session = random.getrandbits(62)
        if metrics.train_loss is None:  # the head computes the loss: it exports it
            metrics.enable_loss()
        self.router = Router(self.cfg.n_stages)
        self.forward_timeout, self.backward_timeout = forward_timeout, backward_timeout
        self.stall_timeout, self.refresh_s = stall_timeout, refresh_s
        self.stop = stop or asyncio.Event()
        self.poll_min_s, self.poll_max_s = poll_min_s, poll_max_s
        # one thread for all work on stage 0, shared with the head's state server (no races)
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="head")
        self.status = status or (lambda text: log.warning(text))
        self.bytes = {"sent": 0, "received": 0}
        self.payload = {"fwd": 0, "bwd": 0}       # whole message bytes per boundary hop, head side
        self.codes = {"fwd": 0, "bwd": 0}         # of which codec bytes of codes, gradients and token ids
        self.payload_tokens = {"fwd": 0, "bwd": 0}
        self.retries = 0
        self.recomputed = 0      # microbatch gradients recomputed on another replica
        self.lost = 0            # microbatch gradients that no replica applied (should stay 0)
        self.crashed_progress = 0  # microbatch updates that lived only in replicas that crashed
        self.unaveraged: dict[tuple[int, str], int] = {}  # per replica: updates since its last averaging
        self.ledger: dict[int, dict[str, dict]] = {}
        self._alive: set[tuple[int, str]] = set()   # (stage, peer) that answered the last check
        self._last_refresh = 0.0
        self._refreshing: asyncio.Task | None = None

    # --- routes --------------------------------------------------------------------------------
    async def refresh(self, force: bool = False) -> None:
        """Update the routes from the DHT. A periodic refresh runs in the background, so a step never
        waits on a slow DHT get (an unresponsive DHT peer makes gets wait for timeouts); `force`
        (a failure, a pause) waits for fresh records."""
        if force:
            await self._read_routes()
        elif time.monotonic() - self._last_refresh >= self.refresh_s and \
                (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.create_task(self._background_refresh())

    async def _background_refresh(self) -> None:
        try:
            await self._read_routes()
        except Exception as e:  # the next refresh tries again; a failing call forces one
            log.warning("could not refresh the routes from the DHT: %s", e)

    async def _read_routes(self) -> None:
        self._last_refresh = time.monotonic()
        records = await read_stage_records(self.dht, self.run)
        for k in range(1, self.cfg.n_stages):
            self.router.update(k, records.get(k, []))
            self.metrics.replicas.labels(str(k)).set(len(records.get(k, [])))

    def replica_counts(self) -> dict[int, int]:
        return {k: len(self.router.replicas(k)) for k in range(1, self.cfg.n_stages)}

    async def wait_for_stages(self, stages=None) -> None:
        """Block until every stage (or each of `stages`) has a usable replica: pause with a status line,
        polling the DHT at growing intervals (no busy retry) and waking early when a ban ends. A stop
        signal (SIGTERM/SIGINT) ends the pause with `Stopped`."""
        started = time.monotonic()
        delay = self.poll_min_s
        while True:
            await self.refresh(force=True)
            waits = {k: self.router.next_unban_in(k) for k in (stages or range(1, self.cfg.n_stages))}
            blocked = {k: w for k, w in waits.items() if w != 0.0}
            if not blocked:
                return
            waited = time.monotonic() - started
            if waited > self.stall_timeout:
                raise StageMissing(f"no usable replica of stage(s) {sorted(blocked)} for {waited:.0f}s")
            self.status(_pause_line(blocked, waited))
            soonest = min((w for w in blocked.values() if w is not None), default=delay)
            await self._pause(min(delay, max(soonest, 0.05)))
            delay = min(2 * delay, self.poll_max_s)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            return
        raise Stopped("stopped by a signal while paused")

    async def call_stage(self, stage: int, method: str, timeout: float, avoid=(), prefer: str | None = None,
                         resend: dict | None = None, **fields) -> tuple[dict, str]:
        """Call `method` on some replica of `stage` (preferably `prefer`, not one in `avoid`), retrying
        on others until one answers. `resend` fields (a backward's input) are added only for a replica
        other than `prefer`, or when `prefer` asks for them. Returns (reply, peer id that answered)."""
        deadline = time.monotonic() + self.stall_timeout
        tried: set[str] = set(avoid)
        while True:
            rep = await self._pick(stage, tried, prefer)
            extra = resend if resend and rep.peer_id != prefer else {}
            if method in ("forward", "backward", "loss"):
                extra = {**extra, "session": self.session}
            self.router.started(rep)
            t0 = time.perf_counter()
            try:
                reply, sent, received = await self.client.call(rep.peer_id, stage, method, timeout=timeout,
                                                               **fields, **extra)
            except RemoteError as e:
                if e.reason == "resend" and resend and not extra:  # it lost the forward's graph: send the input
                    self.router.succeeded(rep, time.perf_counter() - t0)
                    prefer = None
                    continue
                if e.reason not in RETRYABLE:
                    self.router.succeeded(rep, time.perf_counter() - t0)
                    raise
                await self._failed(stage, rep, method, e, tried, deadline)
                continue
            except PeerUnavailable as e:
                await self._failed(stage, rep, method, e, tried, deadline)
                continue
            seconds = time.perf_counter() - t0
            self.router.succeeded(rep, seconds)
            self.metrics.call_seconds.labels(str(stage), method).observe(seconds)
            self._count_message(sent, received)
            reply["wire"] = (sent, received)
            return reply, rep.peer_id

    async def _pick(self, stage: int, tried: set, prefer: str | None):
        while True:
            await self.refresh()
            rep = self.router.usable(stage, prefer) if prefer and prefer not in tried else None
            rep = rep or self.router.choose(stage, exclude=tried)
            if rep is None and tried:
                tried.clear()  # every replica failed once: start over with the ones not banned
                rep = self.router.choose(stage)
            if rep is not None:
                return rep
            await self.wait_for_stages([stage])  # nobody usable: pause until a ban ends or a replica (re)appears

    async def _failed(self, stage: int, rep, method: str, e: Exception, tried: set, deadline: float) -> None:
        ban = self.router.failed(rep)
        tried.add(rep.peer_id)
        self.retries += 1
        self.metrics.retries.labels(str(stage)).inc()
        self.metrics.bans.labels(str(stage)).inc()
        log.warning("stage %d replica %s failed %s (%s); banned %.0fs, retrying elsewhere",
                    stage, rep.peer_id[-8:], method, e, ban)
        if time.monotonic() > deadline:
            raise StageMissing(f"stage {stage}: no replica completed {method} within {self.stall_timeout:.0f}s") from e
        await self.refresh(force=True)

    def _count_message(self, sent: int, received: int) -> None:
        self.bytes["sent"] += sent
        self.bytes["received"] += received
        self.metrics.frame_bytes.labels("sent").inc(sent)
        self.metrics.frame_bytes.labels("received").inc(received)

    # --- one microbatch ------------------------------------------------------------------------
    def _count(self, reply: dict, boundary_out: int, boundary_back: int, pass_out: str, pass_back: str,
               tokens: int) -> None:
        """Count a call's whole messages (every byte, metadata included) on the boundaries they cross:
        the request on `boundary_out` (its pass), the reply on `boundary_back`."""
        for n, codes, boundary, direction, pass_ in (
                (reply["wire"][0], reply["payload"][0], boundary_out, "sent", pass_out),
                (reply["wire"][1], reply["payload"][1], boundary_back, "received", pass_back)):
            key = "fwd" if pass_ == "forward" else "bwd"
            self.payload[key] += n
            self.codes[key] += codes
            self.payload_tokens[key] += tokens
            self.metrics.count_boundary(n, codes, boundary, direction, pass_, tokens, self.cfg.d_model)

    async def _local(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def microbatch(self, step: int, micro: int, split: str = "train") -> float:
        train = split == "train"
        t = self.run.train
        x, y = self.corpus.batch(split, t.microbatch_size, self.cfg.seq_len, self.cfg.seed,
                                 step if train else 0, micro)
        x, y = x.to(self.worker.device), y.to(self.worker.device)
        n = x.numel()
        extra = {"tokens": encode_ints(x, self.cfg.vocab_size)} if self.cfg.boundary == "subspace" else {}
        code = await self._local(self.worker.forward, step, micro, x, None, train)
        msg = encode(code, self.codec)
        inputs, peers = {}, {}
        last = self.cfg.n_stages - 1
        for k in range(1, last):
            inputs[k] = msg
            reply, peers[k] = await self.call_stage(k, "forward", self.forward_timeout, step=step, micro=micro, x=msg,
                                                    eval=not train, **extra)
            msg = reply["y"]
            if train:
                self._count(reply, k - 1, k, "forward", "forward", n)
        loss_fields = dict(step=step, micro=micro, x=msg, targets=encode_ints(y, self.cfg.vocab_size),
                           scale=1.0 / t.microbatches, **extra)
        reply, peer = await self.call_stage(last, "loss", self.backward_timeout, eval=not train, **loss_fields)
        loss = float(reply["loss"])
        if not train:
            return loss
        self._count(reply, last - 1, last - 1, "forward", "backward", n)
        self._hold(last, peer, micro, "loss", loss_fields)
        grad = reply["grad_in"]
        for k in range(last - 1, 0, -1):
            # the replica that ran the forward still holds its graph: send only the gradient
            fields = dict(step=step, micro=micro, grad_out=grad, **extra)
            reply, peer = await self.call_stage(k, "backward", self.backward_timeout, prefer=peers[k],
                                                resend={"x": inputs[k]}, **fields)
            self._count(reply, k, k - 1, "backward", "backward", n)
            self._hold(k, peer, micro, "backward", {**fields, "x": inputs[k]})
            grad = reply["grad_in"]
        await self._local(self.worker.backward, step, micro, x, decode(grad).to(self.worker.device), None)
        return loss

    # --- one step ------------------------------------------------------------------------------
    async def train_step(self, step: int) -> dict:
        await self.wait_for_stages()
        m = self.run.train.microbatches
        self.ledger = {k: {} for k in range(1, self.cfg.n_stages)}
        losses = await asyncio.gather(*(self.microbatch(step, i) for i in range(m)))
        await self._settle(step)
        # Step the replicas that answered the last check; each learns how many replicas of its stage
        # are stepping, so it averages only with peers that are really there (no waiting for the dead).
        peers = sorted(self._alive)
        group = {k: sum(1 for s, _ in peers if s == k) for k in self.ledger}
        results = await asyncio.gather(self._local(self.worker.apply_step, step),
                                       *(self._step_replica(k, p, step, group[k]) for k, p in peers))
        await self._catch_up(step, results[1:])
        tokens = m * self.run.train.microbatch_size * self.cfg.seq_len
        self.metrics.tokens.inc(tokens)
        self.metrics.samples.inc(self.run.train.batch_size)
        self.metrics.steps.inc()
        self.metrics.step.set(step)
        loss = sum(losses) / m
        self.metrics.train_loss.set(loss)
        return {"loss": loss, "replies": [r for r in results if not r.get("failed")]}

    # --- exactly-once gradients ----------------------------------------------------------------
    def _hold(self, stage: int, peer: str, micro: int, method: str, fields: dict) -> None:
        """Remember which replica holds which microbatch's gradients, and how to recompute them."""
        self.ledger.setdefault(stage, {}).setdefault(peer, {})[micro] = (method, fields)

    async def _prepare(self, stage: int, peer: str, step: int, discard: bool = False):
        try:
            reply, _, _ = await self.client.call(peer, stage, "prepare", step=step, discard=discard,
                                                 timeout=self.forward_timeout)
            return reply["held"]
        except (PeerUnavailable, RemoteError):
            return None

    async def _settle(self, step: int, rounds: int = 3) -> None:
        """Before anyone applies `step`: every replica must hold exactly the microbatches the ledger
        says. A replica that died, lost or over-counted gradients is cleared, and its microbatches
        are recomputed on another replica of the same stage (the head kept their inputs)."""
        for _ in range(rounds):
            targets = sorted({(k, r.peer_id) for k in self.ledger for r in self.router.replicas(k)}
                             | {(k, p) for k, holders in self.ledger.items() for p in holders})
            held = await asyncio.gather(*(self._prepare(k, p, step) for k, p in targets))
            self._alive = {t for t, got in zip(targets, held) if got is not None}
            redo = []
            for (k, peer), got in zip(targets, held):
                expected = sorted(self.ledger[k].get(peer, {}))
                if got == expected:
                    continue
                if got is not None:
                    await self._prepare(k, peer, step, discard=True)
                lost = self.ledger[k].pop(peer, {})
                if lost:
                    log.warning("stage %d replica %s %s; recomputing its %d microbatch(es) elsewhere", k, peer[-8:],
                                "is gone" if got is None else f"holds {got} instead of {expected}", len(lost))
                redo += [(k, peer, micro, entry) for micro, entry in lost.items()]
            if not redo:
                return
            self.recomputed += len(redo)
            await asyncio.gather(*(self._recompute(k, peer, micro, entry) for k, peer, micro, entry in redo))
        log.error("step %d: replicas still disagree about gradients after %d rounds", step, rounds)

    async def _recompute(self, stage: int, failed_peer: str, micro: int, entry) -> None:
        method, fields = entry
        _, peer = await self.call_stage(stage, method, self.backward_timeout, avoid={failed_peer}, **fields)
        self._hold(stage, peer, micro, method, fields)

    async def _step_replica(self, stage: int, peer_id: str, step: int, group: int):
        expect = sorted(self.ledger[stage].get(peer_id, {}))
        try:
            reply, sent, received = await self.client.call(peer_id, stage, "step", step=step, expect=expect,
                                                           group=group, timeout=self.backward_timeout)
            self.bytes["sent"] += sent
            self.bytes["received"] += received
            if reply.get("mismatch"):
                log.error("stage %d replica %s changed its gradients after the check", stage, peer_id[-8:])
                return {"stage": stage, "peer_id": peer_id, "failed": True}
            return {"stage": stage, "peer_id": peer_id, **reply}
        except (PeerUnavailable, RemoteError) as e:
            log.warning("stage %d replica %s did not apply step %d: %s", stage, peer_id[-8:], step, e)
            return {"stage": stage, "peer_id": peer_id, "failed": True}

    async def _catch_up(self, step: int, outcomes: list[dict]) -> None:
        """A replica that failed to apply `step` (it died in the step barrier) leaves its microbatches
        unapplied: recompute them on a surviving replica of the stage and apply them there as one
        extra update, so every microbatch reaches the model exactly once. Also account for progress
        that lived only in crashed replicas (applied there, never averaged with anyone)."""
        failed = {(o["stage"], o["peer_id"]) for o in outcomes if o.get("failed")}
        for o in outcomes:
            key = (o["stage"], o["peer_id"])
            if key not in failed:
                self.unaveraged[key] = 0 if o.get("averaged") else self.unaveraged.get(key, 0) + o["micro_count"]
        for stage, dead in sorted(failed):
            self.crashed_progress += self.unaveraged.pop((stage, dead), 0)
            entries = self.ledger[stage].get(dead, {})
            if not entries:
                continue
            survivors = [p for k, p in sorted(self._alive) if k == stage and (k, p) not in failed]
            for peer in survivors:
                if await self._apply_elsewhere(step, stage, peer, entries):
                    self.recomputed += len(entries)
                    self.unaveraged[(stage, peer)] = self.unaveraged.get((stage, peer), 0) + len(entries)
                    log.warning("stage %d: %d microbatch(es) of replica %s recomputed and applied on %s", stage,
                                len(entries), dead[-8:], peer[-8:])
                    break
            else:
                self.lost += len(entries)
                log.error("stage %d: %d microbatch(es) of step %d lost: no surviving replica could apply them",
                          stage, len(entries), step)

    async def _apply_elsewhere(self, step: int, stage: int, peer: str, entries: dict) -> bool:
        try:
            for method, fields in entries.values():
                await self.client.call(peer, stage, method, catchup=True, timeout=self.backward_timeout, **fields)
            reply, _, _ = await self.client.call(peer, stage, "step", step=step, expect=sorted(entries), catchup=True,
                                                 timeout=self.backward_timeout)
            return bool(reply.get("applied"))
        except (PeerUnavailable, RemoteError) as e:
            log.warning("catch-up on %s failed: %s", peer[-8:], e)
            return False

    async def evaluate(self, batches: int = 8) -> float:
        losses = await asyncio.gather(*(self.microbatch(0, i, split="val") for i in range(batches)))
        loss = sum(losses) / len(losses)
        self.metrics.val_loss.set(loss)
        return loss

    async def node_info(self) -> list[dict]:
        """`info` of every known replica (bytes, tokens, peer ids) for the run summary."""
        async def one(stage, peer_id):
            try:
                return await self.client.info(peer_id, stage, timeout=10.0)
            except (PeerUnavailable, RemoteError) as e:
                return {"peer_id": peer_id, "error": str(e)}
        peers = [(k, r.peer_id) for k in range(1, self.cfg.n_stages) for r in self.router.replicas(k)]
        return list(await asyncio.gather(*(one(k, p) for k, p in peers)))
