"""A trainer: a stage-0 replica that feeds its own microbatches into the swarm, without a barrier.

The trainer keeps a window of microbatches in flight and starts the next one as soon as one
returns, across step boundaries. Each microbatch draws its own data (below), runs stage 0, and
sends its code to a replica of stage 1 (node/route.py), which walks it to the tail; the gradient
comes back along the same replicas, each of which adds it to its own gradient buffer and steps on
its own once a step's worth of microbatches is in (swarm/stage_worker.py). Nobody waits for anybody
else's step: more trainers and more replicas mean more microbatches per second.

Data: each trainer reads its own stream (swarm/shards.py), so trainers never draw the same
sequences; stream 0 is exactly train-local's data. A microbatch that no route finished is
skipped, not retried: its stage-0 gradient is never added, and the stages downstream of the
failure never saw its backward (a microbatch is applied at most once on every replica).

`sync=True` starts no microbatch of the next step before this step's are in: with one replica per
stage nothing is ever stale and a step equals train-local's (the parity tests rely on it).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from node.settings import TrainerSettings
from protocol.codec import encode, encode_ints
from protocol.errors import NoRoute, RemoteError
from swarm.deadlines import Deadline, route_timeout
from swarm.shards import batch_key, data_stream

log = logging.getLogger(__name__)


def _waiting_for(missing: list[int]) -> str:
    return (f"waiting for a replica of stage(s) {', '.join(map(str, missing))}; start one with "
            f"`resbm-node join --stage {missing[0]} ...`")


class Stopped(RuntimeError):
    """A stop signal arrived, or the swarm lacked a stage for longer than the trainer may wait."""


@dataclass
class StepDone:
    """One update of this trainer's stage 0: the mean loss of its microbatches, and when."""
    step: int
    loss: float
    seconds: float       # since the previous update (or since training started)
    staleness: float     # mean updates between a microbatch's forward and its backward here


class Trainer:
    def __init__(self, server, corpus, *, settings: TrainerSettings = TrainerSettings(),
                 stop: asyncio.Event | None = None, status=None, stream: int | None = None):
        self.server, self.corpus = server, corpus
        self.worker, self.run, self.metrics = server.worker, server.run, server.metrics
        self.cfg, self.peer_id = self.run.model, server.peer_id
        self.settings = settings
        self.window = settings.window or self.run.train.microbatches
        self.hop = server.next_hop                    # to stage 1: our stage 0's route is our route
        self.view = server.view                       # the swarm's records, as our stage 0 read them
        self.stop = stop or asyncio.Event()
        self.status = status or (lambda text: log.warning(text))
        self.stream = data_stream(self.peer_id) if stream is None else stream
        # microbatches drawn from our stream so far. A trainer that resumes a stage 0 at step s goes on
        # past what its previous life drew (about s+1 steps and a window): the same stream and keys
        # would repeat its data, and replicas that remember those keys would refuse them as duplicates
        self.drawn = 0 if self.worker.applied_step < 0 else \
            (self.worker.applied_step + 1) * self.run.train.microbatches + self.window
        self.inflight = 0
        self.skipped = 0                              # microbatches no route finished (applied on no stage 0)
        self.steps: asyncio.Queue[StepDone] = asyncio.Queue()
        self.paused_since: float | None = None
        self.draining = False                         # closing: no new microbatch, the ones in flight finish
        self.limit = 0                                # microbatches to get through (start: steps x M)
        self.error: str | None = None
        self._changed = asyncio.Condition()
        self._losses: list[float] = []
        self._staleness: list[int] = []
        self._last_step_at = time.perf_counter()
        self._feeders: list[asyncio.Task] = []
        if self.metrics.train_loss is None:
            self.metrics.enable_loss()

    # --- the swarm as this trainer sees it ---------------------------------------------------------
    async def wait_for_stages(self) -> None:
        """Block until every later stage has a replica: pause with a status line, polling the DHT at
        growing intervals; a stop signal or a pause longer than the stall timeout raises `Stopped`."""
        delay = self.settings.poll_min_s
        await self.hop.refresh()  # periodic, in the background: a slow DHT peer must not slow every step
        while self.view.missing_stages():
            await self.hop.refresh(force=True)  # looks missing: make sure
            missing = self.view.missing_stages()
            if not missing:
                break
            self._pause(_waiting_for(missing))
            await self._sleep(delay)
            delay = min(2 * delay, self.settings.poll_max_s)
        self._resume()

    def _pause(self, why: str) -> None:
        now = time.monotonic()
        self.paused_since = self.paused_since or now
        waited = now - self.paused_since
        if waited > self.settings.stall_timeout_s:
            raise Stopped(f"paused for {waited:.0f}s: {why}")
        self.status(f"paused ({waited:.0f}s): {why}")

    def _resume(self) -> None:
        if self.paused_since is not None:
            log.warning("resumed after %.0fs", time.monotonic() - self.paused_since)
            self.paused_since = None

    async def _sleep(self, seconds: float) -> None:
        """Sleep, unless a stop signal comes first (then `Stopped`)."""
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            return
        raise Stopped("stopped by a signal")

    def route_timeout(self) -> float:
        """Budget of one microbatch's walk: every later stage's advertised time for a window of
        microbatches, with slack for a reroute (swarm/deadlines.py), never below the floor."""
        hops = [self.window / max(min((r["throughput"] for r in self.view.records.get(k, [])), default=1.0), 1e-3)
                for k in range(1, self.cfg.n_stages)]
        return max(self.settings.min_route_timeout_s, route_timeout(hops, transit_s=self.hop.settings.transit_s))

    # --- one microbatch ----------------------------------------------------------------------------
    def _draw(self, split: str, index: int):
        """(inputs, targets, step, slot of the step) of our `index`-th microbatch; validation reads
        the same batches everywhere."""
        m = self.run.train.microbatches
        step, slot = batch_key(index, m, self.stream) if split == "train" else (0, index)
        x, y = self.corpus.batch(split, self.run.train.microbatch_size, self.cfg.seq_len, self.cfg.seed, step, slot)
        return x.to(self.worker.device), y.to(self.worker.device), step, slot % m

    async def _walk(self, x, y, code, step: int, micro: int, train: bool) -> dict:
        """The route's reply for one code: one retry on a fresh route; NoRoute or RemoteError when none
        finished it."""
        extra = {"tokens": encode_ints(x, self.cfg.vocab_size)} if self.cfg.boundary == "subspace" else {}
        for attempt in (1, 2):
            try:
                reply, _ = await self.hop.call(Deadline(self.route_timeout()), x.numel(), 0.0, owner=self.peer_id,
                                               step=step, micro=micro, eval=not train,
                                               x=encode(code, self.cfg.wire_codec),
                                               targets=encode_ints(y, self.cfg.vocab_size), **extra)
                return reply
            except (NoRoute, RemoteError) as e:
                if attempt == 2 or (isinstance(e, RemoteError) and e.reason not in ("unavailable", "deadline")) \
                        or (isinstance(e, NoRoute) and e.reason == "downstream"):
                    raise
                log.info("step %d slot %d: no route (%s); trying a fresh one", step, micro, e)
                await self.hop.refresh(force=True)

    async def microbatch(self, index: int, split: str = "train"):
        """The loss of our `index`-th microbatch; in training its gradient is added to our stage 0
        (which steps when a step's worth is in: a StepDone goes to `steps`)."""
        train = split == "train"
        x, y, step, micro = self._draw(split, index)
        t0 = time.perf_counter()
        if train:
            handle, code = await self.server.in_worker(self.worker.begin, x, None)
        else:
            code, handle = await self.server.in_worker(self.worker.evaluate, x), None
        forward_s = time.perf_counter() - t0
        reply = await self._walk(x, y, code, step, micro, train)
        loss = float(reply["loss"])
        if not train:
            return loss
        t1 = time.perf_counter()
        _, outcome = await self.server.in_worker(self.worker.finish, handle, reply["decoded"]["grad_in"].to(self.worker.device))
        self.server.count_compute(x, forward_s + time.perf_counter() - t1)
        self._finished(loss, outcome)
        return loss

    def _finished(self, loss: float, outcome: dict) -> None:
        self.server.after_backward(outcome)  # metrics, and the averaging schedule of our stage 0
        self._losses.append(loss)
        self._staleness.append(outcome["staleness"])
        if not outcome["stepped"]:
            return
        now = time.perf_counter()
        done = StepDone(self.worker.applied_step, sum(self._losses) / len(self._losses), now - self._last_step_at,
                        sum(self._staleness) / len(self._staleness))
        self._losses, self._staleness, self._last_step_at = [], [], now
        self.metrics.train_loss.set(done.loss)
        self.steps.put_nowait(done)

    # --- the window --------------------------------------------------------------------------------
    def _may_start(self) -> bool:
        if self.draining or self.inflight >= self.window or self.drawn - self.skipped >= self.limit:
            return False
        return not self.settings.sync or self.worker.accumulated + self.inflight < self.run.train.microbatches

    async def _feed(self) -> None:
        """One lane of the window: draw, walk, repeat; a failure pauses this lane with a growing delay."""
        delay = self.settings.poll_min_s
        while not self.stop.is_set():
            async with self._changed:
                await self._changed.wait_for(self._may_start)
                index, self.inflight = self.drawn, self.inflight + 1
                self.drawn += 1
            try:
                await self.microbatch(index)
                self._resume()
                delay = self.settings.poll_min_s
            except (NoRoute, RemoteError) as e:
                self.skipped += 1
                self.metrics.skipped.inc()
                await self._after_failure(e, delay)
                delay = min(2 * delay, self.settings.poll_max_s)
            finally:
                async with self._changed:
                    self.inflight -= 1
                    self._changed.notify_all()

    async def _after_failure(self, e: Exception, delay: float) -> None:
        """Say why we pause (a hop's immediate "no usable replica" answer is enough), wait, go on."""
        await self.hop.refresh(force=True)
        missing = self.view.missing_stages()
        self._pause(_waiting_for(missing) if missing else f"the route failed: {e}")
        await self._sleep(delay)

    async def _guarded_feed(self) -> None:
        try:
            await self._feed()
        except Stopped as e:
            self.error = None if self.stop.is_set() else str(e)
            self.stop.set()
        except Exception as e:  # our bug: stop training and say so, rather than a silent dead lane
            log.exception("a trainer lane failed")
            self.error = f"{type(e).__name__}: {e}"
            self.stop.set()

    def start(self, steps: int) -> None:
        """Start the window's lanes to train `steps` more updates of our stage 0 (a skipped microbatch
        is replaced, none is drawn beyond them); updates arrive on `steps`."""
        self.limit = self.drawn - self.skipped + steps * self.run.train.microbatches - self.worker.accumulated
        self.draining = False
        self._last_step_at = time.perf_counter()
        self._feeders = [asyncio.create_task(self._guarded_feed()) for _ in range(self.window)]

    async def close(self) -> None:
        """Stop the lanes. Unless a stop signal came, the microbatches in flight may finish first (within
        a route's timeout), so every stage counts the same ones; otherwise they are lost (applied on no
        stage 0, on the later stages as far as they got)."""
        async with self._changed:
            self.draining = True
            if not self.stop.is_set():
                try:
                    await asyncio.wait_for(self._changed.wait_for(lambda: self.inflight == 0), self.route_timeout())
                except asyncio.TimeoutError:
                    log.warning("%d microbatch(es) still in flight at the end: abandoned", self.inflight)
        for task in self._feeders:
            task.cancel()
        await asyncio.gather(*self._feeders, return_exceptions=True)
        self._feeders = []

    async def next_step(self) -> StepDone:
        """The next update of our stage 0; `Stopped` when training stopped first."""
        get, stopped = asyncio.ensure_future(self.steps.get()), asyncio.ensure_future(self.stop.wait())
        done, _ = await asyncio.wait({get, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            stopped.cancel()
            return get.result()
        get.cancel()
        raise Stopped(self.error or "stopped by a signal")

    async def evaluate(self, batches: int = 8) -> float:
        results = await asyncio.gather(*(self.microbatch(i, split="val") for i in range(batches)),
                                       return_exceptions=True)
        losses = [v for v in results if isinstance(v, float)]
        loss = sum(losses) / len(losses) if losses else float("nan")
        self.metrics.val_loss.set(loss)
        return loss
