"""Serving one stage over libp2p: validate every request, compute in one worker thread, count bytes.

A bad request is the sender's problem: it gets an error saying what was wrong, it is counted by
reason, a peer that keeps sending them is refused for a while, and everyone else is still served.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from protocol import PROTOCOL_VERSION
from protocol.codec import decode, decode_ints, encode, payload_nbytes
from protocol.errors import PayloadError
from protocol.messages import STATE_CHUNK, TRAINER_METHODS, check_request, error_reply, field
from swarm.stage_worker import StageWorker, StaleRequest

log = logging.getLogger(__name__)


class BadPeerTracker:
    """Refuse a peer for `ban_s` seconds after `limit` rejected requests within `window_s`."""

    def __init__(self, limit: int = 20, window_s: float = 60.0, ban_s: float = 120.0):
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


class RateMeter:
    """Tokens per compute-second over the last `window` observations (forward and backward)."""

    def __init__(self, window: int = 32):
        self.window = window
        self.samples: list[tuple[float, int]] = []

    def add(self, seconds: float, tokens: int) -> None:
        self.samples = (self.samples + [(seconds, tokens)])[-self.window:]

    def rate(self) -> float:
        seconds = sum(s for s, _ in self.samples)
        return sum(t for _, t in self.samples) / seconds if seconds > 0 else 0.0


class StageServer:
    def __init__(self, worker: StageWorker, metrics, peer_id: str = "", averager=None, methods=None):
        self.worker, self.metrics, self.peer_id = worker, metrics, peer_id
        self.methods = methods  # None: all; the head serves only ("info", "state")
        self.run = worker.run
        self.cfg = worker.run.model
        self.index = worker.index
        self.fingerprint = worker.run.fingerprint
        self.codec = self.cfg.wire_codec
        self.max_batch = self.run.train.batch_size
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"stage{self.index}")
        self.averager = averager
        self.inflight = 0
        self.compute = RateMeter()
        self._discards_seen = 0
        self.bytes = {"sent": 0, "received": 0}
        self.payload = {"sent": 0, "received": 0}
        self.requests = 0
        self.bad_peers = BadPeerTracker()
        self.tokens_done = 0
        # Largest valid request: x and grad_out of a whole batch in fp32 plus token ids; the rest is headers.
        self.max_frame = 3 * self.max_batch * self.cfg.seq_len * max(self.cfg.code_width, 1) * 4 + (1 << 20)

    # --- accounting ----------------------------------------------------------------------------
    def count_frame(self, direction: str, n: int) -> None:
        self.bytes[direction] += n
        self.metrics.frame_bytes.labels(direction).inc(n)

    def _count_payload(self, tensor_msg: dict, boundary: int, direction: str, pass_: str, tokens: int) -> None:
        n = payload_nbytes(tensor_msg)
        self.payload[direction] += n
        self.metrics.count_payload(n, boundary, direction, pass_, tokens, self.cfg.d_model)

    def rejected(self, err: PayloadError, peer) -> None:
        self.metrics.rejected.labels(err.reason).inc()
        if self.bad_peers.record(str(peer)):
            self.metrics.peer_bans.inc()
            log.warning("peer %s sent too many bad requests; refusing it for %.0fs", peer, self.bad_peers.ban_s)

    @property
    def throughput(self) -> float:
        """Microbatches per second this replica's compute sustains (forward + backward)."""
        return self.compute.rate() / (self.run.train.microbatch_size * self.cfg.seq_len)

    # --- request parsing -----------------------------------------------------------------------
    def _code(self, msg: dict, key: str, shape=None) -> torch.Tensor:
        width = self.cfg.code_width
        limit = self.max_batch * self.cfg.seq_len * width
        t = decode(field(msg, key, dict), expect_codec=self.codec, width=width, max_elems=limit)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise PayloadError("shape", f"{key} has shape {list(t.shape)}, expected {list(shape)}")
        if t.ndim != 3 or t.shape[-1] != width or not 1 <= t.shape[0] <= self.max_batch \
                or not 1 <= t.shape[1] <= self.cfg.seq_len:
            raise PayloadError("shape", f"{key} has shape {list(t.shape)}; stage {self.index} takes "
                                        f"[batch<={self.max_batch}, tokens<={self.cfg.seq_len}, {width}]")
        return t.to(self.worker.device)

    def _ints(self, msg: dict, key: str, shape) -> torch.Tensor:
        t = decode_ints(field(msg, key, dict), self.cfg.vocab_size, max_elems=self.max_batch * self.cfg.seq_len)
        if tuple(t.shape) != tuple(shape):
            raise PayloadError("shape", f"{key} has shape {list(t.shape)}, expected {list(shape)}")
        return t.to(self.worker.device)

    def _tokens(self, msg: dict, shape):
        return self._ints(msg, "tokens", shape) if self.cfg.boundary == "subspace" else None

    async def _compute(self, fn, *args):
        result = await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        # the worker drops the gradients of a step the head abandoned; export that as a counter
        fresh = self.worker.discarded_steps - self._discards_seen
        if fresh:
            self.metrics.dropped_grads.inc(fresh)
            self._discards_seen += fresh
        return result

    # --- dispatch ------------------------------------------------------------------------------
    async def handle(self, msg: dict, peer) -> dict:
        if self.bad_peers.is_banned(str(peer)):
            self.metrics.rejected.labels("banned").inc()
            return error_reply("state", "too many bad requests from your peer id; refused for a while")
        started = time.perf_counter()
        method = "invalid"
        self.inflight += 1
        self.metrics.queue.set(self.inflight)
        try:
            method = check_request(msg, self.fingerprint)
            trainers = self.run.train.trainers
            if trainers and method in TRAINER_METHODS and str(peer) not in trainers:
                raise PayloadError("forbidden", f"only this run's trainers may call {method!r}; your peer id "
                                                f"{peer} is not among them")
            if self.methods is not None and method not in self.methods:
                raise PayloadError("method", f"this node (stage {self.index}) serves only {', '.join(self.methods)}")
            reply = await getattr(self, f"_on_{method}")(msg)
            self.requests += 1
            return {"ok": True, **reply}
        except PayloadError as e:
            self.rejected(e, peer)
            return error_reply(e.reason, e.detail)
        except StaleRequest as e:
            return error_reply("state", str(e))
        except Exception as e:  # our bug, not the peer's: report it, keep serving
            log.exception("stage %d failed on %s", self.index, method)
            return error_reply("internal", f"{type(e).__name__}: {e}")
        finally:
            self.inflight -= 1
            self.metrics.queue.set(self.inflight)
            self.metrics.rpc_seconds.labels(method).observe(time.perf_counter() - started)

    def _step_micro(self, msg, train: bool = True):
        step, micro = field(msg, "step", int, minimum=0), field(msg, "micro", int, minimum=0)
        if train and micro >= self.run.train.microbatches:  # bounds what a step accumulates per peer
            raise PayloadError("malformed", f"field 'micro' must be < {self.run.train.microbatches}, got {micro}")
        return step, micro

    @staticmethod
    def _flag(msg, key: str) -> bool:
        flag = msg.get(key, False)
        if not isinstance(flag, bool):
            raise PayloadError("malformed", f"field {key!r} must be bool, got {type(flag).__name__}")
        return flag

    def _train_flag(self, msg) -> bool:
        return not self._flag(msg, "eval")

    async def _on_forward(self, msg):
        if self.worker.stage.is_last:
            raise PayloadError("method", f"stage {self.index} is the last stage: call 'loss', not 'forward'")
        train = self._train_flag(msg)
        step, micro = self._step_micro(msg, train)
        x = self._code(msg, "x")
        tokens = self._tokens(msg, x.shape[:2])
        t0 = time.perf_counter()
        y = await self._compute(self.worker.forward, step, micro, x, tokens, train)
        out = encode(y, self.codec)
        if train:
            self._count_payload(msg["x"], self.index - 1, "received", "forward", x.shape[0] * x.shape[1])
            self._count_payload(out, self.index, "sent", "forward", x.shape[0] * x.shape[1])
            self._done(x, time.perf_counter() - t0)
        return {"y": out}

    async def _on_backward(self, msg):
        step, micro = self._step_micro(msg)
        x = self._code(msg, "x")
        grad = self._code(msg, "grad_out", shape=(*x.shape[:2], self.cfg.code_width))
        tokens = self._tokens(msg, x.shape[:2])
        t0 = time.perf_counter()
        g = await self._compute(self.worker.backward, step, micro, x, grad, tokens, self._flag(msg, "catchup"))
        out = encode(g, self.codec)
        n = x.shape[0] * x.shape[1]
        self._count_payload(msg["grad_out"], self.index, "received", "backward", n)
        self._count_payload(out, self.index - 1, "sent", "backward", n)
        self.compute.add(time.perf_counter() - t0, 0)
        return {"grad_in": out}

    async def _on_loss(self, msg):
        if not self.worker.stage.is_last:
            raise PayloadError("method", f"stage {self.index} is not the last stage: 'loss' is served by the tail")
        train = self._train_flag(msg)
        step, micro = self._step_micro(msg, train)
        x = self._code(msg, "x")
        targets = self._ints(msg, "targets", x.shape[:2])
        tokens = self._tokens(msg, x.shape[:2])
        scale = msg.get("scale", 1.0)
        if not isinstance(scale, float) or not math.isfinite(scale) or not 0 < scale <= 1:
            raise PayloadError("malformed", f"scale must be a float in (0, 1], got {scale!r}")
        t0 = time.perf_counter()
        loss, g = await self._compute(self.worker.loss, step, micro, x, targets, scale, tokens, train,
                                      self._flag(msg, "catchup"))
        reply = {"loss": loss}
        if train:
            reply["grad_in"] = encode(g, self.codec)
            n = x.shape[0] * x.shape[1]
            self._count_payload(msg["x"], self.index - 1, "received", "forward", n)
            self._count_payload(reply["grad_in"], self.index - 1, "sent", "backward", n)
            self._done(x, time.perf_counter() - t0)
        return reply

    def _done(self, x, seconds):
        n = x.shape[0] * x.shape[1]
        self.tokens_done += n
        self.compute.add(seconds, n)
        self.metrics.tokens.inc(n)
        self.metrics.samples.inc(x.shape[0])
        self.metrics.tokens_per_second.set(self.compute.rate())

    async def _on_prepare(self, msg):
        step = field(msg, "step", int, minimum=0)
        if msg.get("discard"):
            await self._compute(self.worker.discard, step)
        return {"held": self.worker.held(step), "applied_step": self.worker.applied_step}

    async def _on_step(self, msg):
        step = field(msg, "step", int, minimum=0)
        expect = msg.get("expect")
        if expect is not None and (not isinstance(expect, list) or not all(isinstance(m, int) for m in expect)):
            raise PayloadError("malformed", "expect must be a list of microbatch ids")
        result = await self._compute(self.worker.apply_step, step, expect, self._flag(msg, "catchup"))
        if result["applied"]:
            self.metrics.steps.inc()
        self.metrics.step.set(self.worker.applied_step)
        if self.averager is not None and not result["duplicate"]:
            group = msg.get("group")
            if group is not None and (not isinstance(group, int) or isinstance(group, bool) or group < 1):
                raise PayloadError("malformed", "group must be a positive int")
            result["averaged"] = await self.averager.maybe_average(step, group)
        return result

    async def _on_info(self, msg):
        return {"stage": self.index, "peer_id": self.peer_id, "step": self.worker.applied_step,
                "fingerprint": self.fingerprint, "version": PROTOCOL_VERSION, "throughput": self.throughput,
                "queue": self.inflight, "bytes_sent": self.bytes["sent"], "bytes_received": self.bytes["received"],
                "payload_sent": self.payload["sent"], "payload_received": self.payload["received"],
                "tokens": self.tokens_done, "requests": self.requests}

    async def _on_state(self, msg):
        offset = field(msg, "offset", int, minimum=0)
        blob = await self._compute(self.worker.state_bytes)
        return {"step": self.worker.applied_step, "total": len(blob), "data": blob[offset:offset + STATE_CHUNK]}


def measure_throughput(server: StageServer, repeats: int = 5) -> None:
    """Time forward+backward of a random microbatch so a new replica advertises a real rate.
    The fastest of a few runs is kept: on a busy machine the others measure contention, not us."""
    cfg, worker = server.cfg, server.worker
    b, t = server.run.train.microbatch_size, cfg.seq_len
    times = []
    for _ in range(repeats + 1):
        x = torch.randn(b, t, cfg.code_width, device=worker.device)
        tokens = torch.randint(0, cfg.vocab_size, (b, t), device=worker.device)
        t0 = time.perf_counter()
        leaf = x.requires_grad_(True)
        out = worker.stage(leaf, tokens)
        torch.autograd.grad(out.float().square().mean(), leaf)  # input grad only: parameters stay untouched
        times.append(time.perf_counter() - t0)
    server.compute.add(min(times[1:]), b * t)  # the first run only warms up allocators and kernels
