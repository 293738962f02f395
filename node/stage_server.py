"""Serving one stage as a hivemind expert: decode a call's codes, compute in one worker thread, call the
next stage, count bytes.

The stage answers under hivemind ConnectionHandler's handler names (so a stock RemoteExpert reaches
rpc_info / rpc_forward / rpc_backward) plus the project's own rpc_* calls; protocol/contract.py
describes every call. Every call first passes node/request_gate.py (the checks every request gets,
refusals and bans); what is left here is what a stage does with a good one.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from protocol import PROTOCOL_VERSION
from protocol.codec import decode, decode_ints, encode, payload_nbytes
from protocol.contract import STATE_CHUNK, Method
from protocol.errors import NoRoute, PayloadError, RemoteError
from protocol.records import stage_key
from protocol.service import StageService
from node.admission import Admission
from node.announce import RecordView
from node.request_gate import RequestGate
from node.route import NextHop
from node.settings import RecordSettings, RouteSettings, ServeSettings
from swarm.deadlines import Deadline
from swarm.stage_worker import StageWorker

log = logging.getLogger(__name__)

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


STATE_CHUNK_S = 2.0  # a state reply is about this many seconds of the serving node's link, at most STATE_CHUNK


def state_chunk_bytes(link_mbit: float) -> int:
    """Bytes of state per reply for a node whose link carries `link_mbit` per direction. A reply leaves
    in one write: on a slow link the codes keep busy (a trainer handing its state to a trainer joining on
    0.5 Mbit/s, scaling lab), a 2 MiB reply took past the joiner's 60 s per call and every try failed
    ("did not answer state within 60s", then "stream reset"), so the joiner never served. A few seconds
    of the link per reply keeps each call short; at the default 10 Mbit/s it is STATE_CHUNK."""
    return int(min(STATE_CHUNK, max(64 << 10, link_mbit * 1e6 / 8 * STATE_CHUNK_S)))


class StageServer(StageService):
    """One stage's servicer. Register with `await server.add_p2p_handlers(p2p)` (in-process: no forked
    handler, no TaskPool merging microbatches, no recompute of forward on backward). With a DHT it reads
    the swarm's records (`view`: who may call it) and calls the next stage (`next_hop`, but for the tail)."""

    def __init__(self, worker: StageWorker, metrics, peer_id: str = "", averager=None, dht=None, p2p=None, *,
                 records: RecordSettings = RecordSettings(), route: RouteSettings = RouteSettings(),
                 serve: ServeSettings = ServeSettings(), state_chunk: int = STATE_CHUNK):
        self.worker, self.metrics, self.peer_id = worker, metrics, peer_id
        self.state_chunk = state_chunk  # bytes of state per reply (state_chunk_bytes: a few seconds of our link)
        self.run = worker.run
        # a trainer (stage 0) takes no codes: it serves only its state (to joining trainers)
        methods = ("state",) if worker.index == 0 else ("forward", "train", "state")
        self.cfg = worker.run.model
        self.index = worker.index
        self.uid = stage_key(self.run.run_id, self.index)  # also its DHT key
        self.fingerprint = worker.run.fingerprint
        self.codec, self.codec_bwd = self.cfg.wire_codec, self.cfg.wire_codec_bwd
        self.max_batch = self.run.train.batch_size
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"stage{self.index}")
        self.averager = averager
        self.compute = RateMeter()
        self.bytes = {"sent": 0, "received": 0}
        self.state_bytes = {"sent": 0, "received": 0}
        self.snapshots = StateSnapshots()  # of the state, for joiners' downloads
        self.payload = {"sent": 0, "received": 0}
        self.admission = Admission(self.run.train.trainers, per_peer=2 * self.run.train.microbatches + 4,
                                   strangers=serve.strangers, joiners=serve.joiner_downloads,
                                   state_others=serve.other_downloads)
        self.tokens_done = 0
        # the records that say who may call us (stage index - 1), and our next hop (stage index + 1)
        self.view = RecordView(dht, self.run, records, metrics) if dht is not None else None
        self.next_hop = NextHop(self.index + 1, self.run, self.view, p2p, metrics, self.count_message, route,
                                me=peer_id or None) \
            if dht is not None and self.index + 1 < self.cfg.n_stages else None
        self.handlers = {"forward": self._on_forward, "train": self._on_train, "state": self._on_state}
        # Largest valid request: x and grad_out of a whole batch in fp32 plus token ids and metadata.
        max_request = 3 * self.max_batch * self.cfg.seq_len * max(self.cfg.code_width, 1) * 4 + (1 << 20)
        self.gate = RequestGate(self.uid, self.index, methods, self.fingerprint, max_request, metrics,
                                handle=self._handle, on_served=self._account, count_message=self.count_message,
                                serve=serve)

    @property
    def inflight(self) -> int:
        """Calls being served now (the record's queue)."""
        return self.gate.inflight

    # --- accounting ----------------------------------------------------------------------------
    def count_message(self, direction: str, n: int, method: str = "") -> None:
        """Every message this node sends or receives, as server or caller. State downloads served to
        joiners are a one-off join cost, counted apart (like averaging), not in the route's bytes."""
        (self.state_bytes if method == "state" else self.bytes)[direction] += n
        self.metrics.frame_bytes.labels(direction).inc(n)

    def _account(self, name: str, fields: dict, tensors: dict, reply_tensors: dict, received: int, sent: int):
        """A training call's two messages, whole, on the boundary they crossed (the one before this stage)."""
        if name != "train" or fields.get("eval"):
            return
        shape = tensors["x"]["shape"]
        tokens = shape[0] * shape[1]
        codes = (sum(payload_nbytes(t) for t in tensors.values()), sum(payload_nbytes(t) for t in reply_tensors.values()))
        self.payload["received"] += codes[0]
        self.payload["sent"] += codes[1]
        for pass_, direction, n, code in (("forward", "received", received, codes[0]),
                                          ("backward", "sent", sent, codes[1])):
            self.metrics.count_boundary(n, code, self.index - 1, direction, pass_, tokens, self.cfg.d_model)

    @property
    def throughput(self) -> float:
        """Microbatches per second this replica's compute sustains (forward + backward)."""
        return self.compute.rate() / (self.run.train.microbatch_size * self.cfg.seq_len)

    # --- hivemind handlers ---------------------------------------------------------------------
    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        if request.uid != self.uid:
            raise ValueError(f"this peer serves expert {self.uid!r}, not {request.uid!r}")
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(self.info()))

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self.gate.serve("forward", request, context)

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self.gate.serve("backward", request, context)  # refused: training goes through rpc_train

    async def rpc_forward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                                 context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for part in self.gate.serve_stream("forward", requests, context):
            yield part

    async def rpc_backward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                                  context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for part in self.gate.serve_stream("backward", requests, context):
            yield part

    async def rpc_train(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self.gate.serve("train", request, context)

    async def rpc_train_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                               context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for part in self.gate.serve_stream("train", requests, context):
            yield part

    async def rpc_state(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self.gate.serve("state", request, context)

    # --- what a good request gets -------------------------------------------------------------
    async def _handle(self, method: Method, fields: dict, tensors: dict, peer: str) -> tuple[dict, dict]:
        """A request the gate let through: who may call it, a slot for it, then its handler."""
        if method.name == "train" and not fields["eval"]:
            await self._authorize_train(fields, peer)
        with self.admission.slot(method.name, peer):
            return await self.handlers[method.name](fields, tensors, peer)

    async def _authorize_train(self, f: dict, peer: str) -> None:
        """A microbatch comes from its owner (stage 1) or from a replica of the previous stage, and
        its owner must be one of the run's trainers when the run lists them."""
        trainers = self.run.train.trainers
        if trainers and f["owner"] not in trainers:
            raise PayloadError("forbidden", f"microbatch owner {f['owner']} is not one of this run's trainers")
        if self.index == 1:
            if peer != f["owner"]:
                raise PayloadError("forbidden", f"stage 1 takes a microbatch from its owner only, not from {peer}")
            return
        if peer not in self.view.peers(self.index - 1):
            if time.monotonic() - self.view.last_read > 2.0:  # a replica that joined since (strangers
                await self.view.refresh(force=True)          # cannot make us read the DHT per request)
            if not self.view.peers(self.index - 1):  # our DHT read found nobody at all (a slow get): we cannot tell, try again
                raise PayloadError("unavailable", f"stage {self.index} cannot read stage {self.index - 1}'s records "
                                                  f"right now")
            if peer not in self.view.peers(self.index - 1):
                raise PayloadError("forbidden", f"peer {peer} is not a replica of stage {self.index - 1} in the DHT")

    # --- tensors -------------------------------------------------------------------------------
    def _code(self, tensors: dict, key: str, codec: str | None, shape=None) -> torch.Tensor:
        width = self.cfg.code_width
        limit = self.max_batch * self.cfg.seq_len * width
        t = decode(tensors[key], expect_codec=codec, width=width, max_elems=limit)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise PayloadError("shape", f"{key} has shape {list(t.shape)}, expected {list(shape)}")
        if t.ndim != 3 or t.shape[-1] != width or not 1 <= t.shape[0] <= self.max_batch \
                or not 1 <= t.shape[1] <= self.cfg.seq_len:
            raise PayloadError("shape", f"{key} has shape {list(t.shape)}; stage {self.index} takes "
                                        f"[batch<={self.max_batch}, tokens<={self.cfg.seq_len}, {width}]")
        return t.to(self.worker.device)

    def _ints(self, tensors: dict, key: str, shape) -> torch.Tensor:
        if key not in tensors:
            raise PayloadError("malformed", f"missing tensor {key!r}")
        t = decode_ints(tensors[key], self.cfg.vocab_size, max_elems=self.max_batch * self.cfg.seq_len)
        if tuple(t.shape) != tuple(shape):
            raise PayloadError("shape", f"{key} has shape {list(t.shape)}, expected {list(shape)}")
        return t.to(self.worker.device)

    def _tokens(self, tensors: dict, shape):
        return self._ints(tensors, "tokens", shape) if self.cfg.boundary == "subspace" else None

    def _reply_codec(self, fields: dict, codec: str) -> str:
        """Stock clients get a plain float codec they can read (bf16 when the swarm's has scales)."""
        return codec if not fields.get("stock") or codec in ("fp32", "bf16", "fp16") else "bf16"

    async def in_worker(self, fn, *args):
        """`fn(*args)` in the stage's one worker thread, between two microbatches' compute."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def after_backward(self, outcome: dict) -> None:
        """A backward's outcome (StageWorker.finish): staleness, and the replica's own step when one
        was due (an averaging round may follow it, in the background)."""
        self.metrics.staleness.observe(outcome["staleness"])
        if not outcome["added"]:
            self.metrics.duplicates.inc()
        if outcome["stepped"]:
            self.metrics.steps.inc()
            self.metrics.step.set(self.worker.applied_step)
            if self.averager is not None:
                self.averager.after_step(self.worker.applied_step, self.in_worker)

    # --- methods -------------------------------------------------------------------------------
    async def _on_forward(self, f: dict, tensors: dict, peer: str):
        """Eval forward of a stage before the last (stock hivemind clients use it)."""
        if self.worker.stage.is_last:
            raise PayloadError("method", f"stage {self.index} is the last stage: it needs targets, call 'train' "
                                         f"with eval=true")
        x = self._code(tensors, "x", None if f.get("stock") else self.codec)
        y = await self.in_worker(self.worker.evaluate, x, self._tokens(tensors, x.shape[:2]))
        return {}, {"y": encode(y, self._reply_codec(f, self.codec))}

    async def _on_train(self, f: dict, tensors: dict, peer: str):
        """One microbatch from here to the tail and back: forward, the next hop's reply, backward."""
        deadline = Deadline(f["timeout_s"])
        x = self._code(tensors, "x", self.codec)
        targets = self._ints(tensors, "targets", x.shape[:2])  # checked at every hop; only the tail uses them
        tokens = self._tokens(tensors, x.shape[:2])
        if f["eval"]:
            return await self._eval(deadline, f, tensors, x, targets, tokens)
        if f["micro"] >= self.run.train.microbatches:  # a slot of the owner's step
            raise PayloadError("malformed", f"field 'micro' must be < {self.run.train.microbatches}, got {f['micro']}")
        key = (f["owner"], f["step"], f["micro"])  # a rerouted walk's second visit is not added twice
        t0 = time.perf_counter()
        if self.worker.stage.is_last:
            loss, g, outcome = await self.in_worker(self.worker.loss_step, x, targets, tokens, key)
            self.count_compute(x, time.perf_counter() - t0)
            self.after_backward(outcome)
            return {"loss": loss, "route": [self.peer_id]}, {"grad_in": encode(g, self.codec_bwd)}
        handle, y = await self.in_worker(self.worker.begin, x, tokens)
        forward_s = time.perf_counter() - t0
        reply, route = await self._send_on(deadline, x, f, tensors, encode(y, self.codec), reserve_s=2 * forward_s)
        t1 = time.perf_counter()
        g, outcome = await self.in_worker(self.worker.finish, handle, reply["decoded"]["grad_in"].to(self.worker.device),
                                         key)
        self.count_compute(x, forward_s + time.perf_counter() - t1)
        self.after_backward(outcome)
        return {"loss": reply["loss"], "route": route}, {"grad_in": encode(g, self.codec_bwd)}

    async def _eval(self, deadline, f: dict, tensors: dict, x, targets, tokens):
        if self.worker.stage.is_last:
            loss = await self.in_worker(self.worker.evaluate, x, tokens, targets)
            return {"loss": loss, "route": [self.peer_id]}, {}
        y = await self.in_worker(self.worker.evaluate, x, tokens)
        reply, route = await self._send_on(deadline, x, f, tensors, encode(y, self.codec))
        return {"loss": reply["loss"], "route": route}, {}

    async def _send_on(self, deadline, x, f: dict, tensors: dict, code: dict, reserve_s: float = 0.0):
        """The next stage's reply and the route from here to the tail; targets and token ids travel on
        as they came (the tail decodes them)."""
        passed = {n: tensors[n] for n in ("targets", "tokens") if n in tensors}
        try:
            reply, _ = await self.next_hop.call(deadline, x.shape[0] * x.shape[1], reserve_s, owner=f["owner"],
                                                   step=f["step"], micro=f["micro"], eval=f["eval"], x=code, **passed)
        except NoRoute as e:
            raise PayloadError("deadline" if e.reason == "deadline" else "downstream", f"stage {self.index}: {e}") from e
        except RemoteError as e:  # the next stage refused what we sent: not the caller's fault
            raise PayloadError("downstream", f"stage {self.index + 1} refused: {e}") from e
        return reply, [self.peer_id] + list(reply["route"])  # the route was checked by the next hop

    def count_compute(self, x, seconds) -> None:
        """Tokens of a microbatch this stage computed (forward + backward) in `seconds`."""
        n = x.shape[0] * x.shape[1]
        self.tokens_done += n
        self.compute.add(seconds, n)
        self.metrics.tokens.inc(n)
        self.metrics.samples.inc(x.shape[0])
        self.metrics.compute_tokens_per_second.set(self.compute.rate())

    async def _on_state(self, f: dict, tensors: dict, peer: str):
        """One chunk of a state snapshot: a download's first call takes the snapshot (the step label and the
        bytes come from one moment of the worker thread: they always agree), later calls read it on by offset,
        so a joiner on a slow link gets one consistent state however many steps happen meanwhile."""
        if f["snapshot"]:
            snap = self.snapshots.get(f["snapshot"])
            if snap is None:
                raise PayloadError("unavailable", f"state snapshot {f['snapshot']} is no longer held here; start the "
                                                  f"download again")
        else:
            snap = self.snapshots.take(*await self.in_worker(
                lambda: (self.worker.generation, self.worker.applied_step, self.worker.state_bytes())))
        sid, step, blob = snap
        offset = f["offset"]
        return {"step": step, "total": len(blob), "data": blob[offset:offset + self.state_chunk], "snapshot": sid}, {}

    # --- info ----------------------------------------------------------------------------------
    def info(self) -> dict:
        """hivemind's expert info (what a stock RemoteExpert reads) plus this stage's own figures."""
        width, seq = self.cfg.code_width, self.cfg.seq_len
        code = BatchTensorDescriptor(seq, width, dtype=torch.float32)
        return {"forward_schema": ((code,), {}), "outputs_schema": code, "keyword_names": (),
                "resbm": {"stage": self.index, "peer_id": self.peer_id, "step": self.worker.applied_step,
                          "fingerprint": self.fingerprint, "version": PROTOCOL_VERSION, "uid": self.uid,
                          "codec": self.codec, "codec_bwd": self.codec_bwd, "code_width": width,
                          "throughput": self.throughput, "queue": self.inflight,
                          "bytes_sent": self.bytes["sent"], "bytes_received": self.bytes["received"],
                          "state_bytes_sent": self.state_bytes["sent"],
                          "state_bytes_received": self.state_bytes["received"],
                          "payload_sent": self.payload["sent"], "payload_received": self.payload["received"],
                          "tokens": self.tokens_done, "requests": self.gate.requests,
                          "next_hop_calls": dict(self.next_hop.calls) if self.next_hop is not None else {},
                          "averaging": self.averager.figures() if self.averager is not None else None}}

    @property
    def replica_distance(self) -> float | None:
        """How far this replica was from its group's mean at its last averaging round (None: none yet)."""
        return self.averager.distance if self.averager is not None else None


class StateSnapshots:
    """Serialized states that joiners are downloading: one per weight generation (joiners that start
    meanwhile share it), at most `keep`, each dropped `idle_s` after its last chunk was read."""

    def __init__(self, keep: int = 2, idle_s: float = 300.0):
        self.keep, self.idle_s = keep, idle_s
        self.held: dict[str, list] = {}   # id -> [generation, step, blob, last read (monotonic)]

    def take(self, generation: int, step: int, blob: bytes) -> tuple[str, int, bytes]:
        self._expire()
        sid = next((k for k, v in self.held.items() if v[0] == generation), None)
        if sid is None:
            sid = f"{step}-{secrets.token_hex(6)}"
            self.held[sid] = [generation, step, blob, time.monotonic()]
            while len(self.held) > self.keep:
                del self.held[min(self.held, key=lambda k: self.held[k][3])]  # the least recently read
        return self.get(sid)

    def get(self, sid: str) -> tuple[str, int, bytes] | None:
        self._expire()
        snap = self.held.get(sid)
        if snap is None:
            return None
        snap[3] = time.monotonic()
        return sid, snap[1], snap[2]

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [k for k, v in self.held.items() if now - v[3] > self.idle_s]:
            del self.held[sid]


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
