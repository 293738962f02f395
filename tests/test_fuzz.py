"""Fuzzing live stages over real libp2p: malformed payloads of every kind are refused with a clear
reason before any compute, counted by reason, a persistent offender is banned, honest peers keep
being served, and memory stays bounded."""
import asyncio
import os
import random

import msgpack
import numpy as np
import pytest
import torch
from hivemind.p2p import PeerID

from node.dht import start_dht, visible_maddrs
from node.metrics import NodeMetrics
from node.rpc import RemoteError, call, serve
from node.runtime import SocketJanitor
from node.stage_server import BadPeerTracker, StageServer
from protocol import PROTOCOL_VERSION
from protocol.codec import encode, encode_ints
from protocol.messages import HANDLER_NAME, pack, read_frame, request, unpack
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.stage_worker import StageWorker

pytestmark = pytest.mark.swarm

RUN = RunConfig(model=ModelConfig(d_model=64, n_layers=3, n_heads=2, seq_len=32, n_stages=3, ratio=16),
                train=TrainConfig(batch_size=8, microbatches=2), run_id="fuzz")
B = RUN.model.code_width  # 4
FP = RUN.fingerprint


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def code(*shape, codec="bf16", data=None, **extra):
    msg = encode(torch.randn(*shape), codec) if data is None else {"codec": codec, "shape": list(shape), "data": data}
    return {**msg, **extra}


def bf16_bits(bits: int, n: int) -> bytes:
    return np.full(n, bits, dtype=np.uint16).tobytes()


def fwd(**kw):
    fields = {"step": 1, "micro": 0, "x": code(2, 32, B)}
    fields.update(kw)
    return request("forward", FP, **fields)


def bwd(**kw):
    fields = {"step": 1, "micro": 0, "x": code(2, 32, B), "grad_out": code(2, 32, B)}
    fields.update(kw)
    return request("backward", FP, **fields)


def loss(**kw):
    fields = {"step": 1, "micro": 0, "x": code(2, 32, B), "targets": encode_ints(torch.zeros(2, 32, dtype=torch.long), 256),
              "scale": 0.5}
    fields.update(kw)
    return request("loss", FP, **fields)


# (name, target stage, message, expected reason)
MALFORMED = [
    ("wrong codec (dtype)", 1, fwd(x=code(2, 32, B, codec="fp32")), "codec"),
    ("unknown codec", 1, fwd(x=code(2, 32, B, codec="float64", data=b"\0" * 2 * 32 * B * 8)), "codec"),
    ("full-width tensor", 1, fwd(x=code(2, 32, 64)), "shape"),
    ("2-d tensor", 1, fwd(x=code(64, B)), "shape"),
    ("5-d tensor", 1, fwd(x=code(1, 1, 2, 32, B)), "shape"),
    ("sequence too long", 1, fwd(x=code(2, 33, B)), "shape"),
    ("batch over the limit", 1, fwd(x=code(9, 32, B)), "size"),
    ("negative dim", 1, fwd(x={"codec": "bf16", "shape": [-2, 32, B], "data": b""}), "shape"),
    ("bool dim", 1, fwd(x={"codec": "bf16", "shape": [True, 32, B], "data": b"\0" * 2 * 32 * B}), "shape"),
    ("empty batch", 1, fwd(x=code(0, 32, B, data=b"")), "shape"),
    ("NaN values", 1, fwd(x=code(2, 32, B, data=bf16_bits(0x7FC0, 2 * 32 * B))), "nonfinite"),
    ("inf values", 1, fwd(x=code(2, 32, B, data=bf16_bits(0x7F80, 2 * 32 * B))), "nonfinite"),
    ("-inf grad", 1, bwd(grad_out=code(2, 32, B, data=bf16_bits(0xFF80, 2 * 32 * B))), "nonfinite"),
    ("data shorter than shape", 1, fwd(x=code(2, 32, B, data=b"\0" * 10)), "size"),
    ("data longer than shape", 1, fwd(x=code(2, 32, B, data=b"\0" * (2 * 32 * B * 2 + 2))), "size"),
    ("huge declared shape", 1, fwd(x={"codec": "bf16", "shape": [10**6, 32, B], "data": b""}), "size"),
    ("data is a string", 1, fwd(x={"codec": "bf16", "shape": [2, 32, B], "data": "abc"}), "malformed"),
    ("tensor is a list", 1, fwd(x=[1, 2, 3]), "malformed"),
    ("missing x", 1, request("forward", FP, step=1, micro=0), "malformed"),
    ("grad shape differs from x", 1, bwd(grad_out=code(1, 32, B)), "shape"),
    ("step is a string", 1, fwd(step="1"), "malformed"),
    ("negative micro", 1, fwd(micro=-1), "malformed"),
    ("micro beyond the step's microbatches", 1, bwd(micro=10**6), "malformed"),
    ("eval not a bool", 1, fwd(eval="yes"), "malformed"),
    ("unknown method", 1, request("drop_tables", FP), "method"),
    ("loss on a middle stage", 1, loss(), "method"),
    ("forward on the last stage", 2, fwd(), "method"),
    ("other run fingerprint", 1, {**fwd(), "fp": "0" * 16}, "fingerprint"),
    ("other protocol version", 1, {**fwd(), "v": PROTOCOL_VERSION + 7}, "version"),
    ("empty message", 1, {}, "version"),
    ("token id beyond vocab", 2, loss(targets={"codec": "u16", "shape": [2, 32],
                                               "data": np.full(64, 300, np.uint16).tobytes()}), "token_range"),
    ("negative token id", 2, loss(targets={"codec": "i32", "shape": [2, 32],
                                           "data": np.full(64, -1, np.int32).tobytes()}), "token_range"),
    ("targets shape differs", 2, loss(targets=encode_ints(torch.zeros(2, 31, dtype=torch.long), 256)), "shape"),
    ("scale out of range", 2, loss(scale=2.0), "malformed"),
    ("scale NaN", 2, loss(scale=float("nan")), "malformed"),
]

GARBAGE_FRAMES = [  # raw frames: (name, bytes after the 8-byte length header, declared length or None)
    ("empty frame", b"", None),
    ("random bytes", bytes(random.Random(0).getrandbits(8) for _ in range(4096)), None),
    ("msgpack list", msgpack.packb([1, 2, 3]), None),
    ("msgpack int-keyed map", msgpack.packb({1: 2}), None),
    ("msgpack bin", msgpack.packb(b"\0" * 100), None),
    ("frame over the node's limit", b"", "over"),
    ("frame of 1 TiB declared", b"", 1 << 40),
]


class Harness:
    def __init__(self):
        self.janitor = SocketJanitor()
        self.dhts, self.p2ps, self.servers = [], [], {}

    async def start(self):
        for stage in (1, 2):
            dht = start_dht(RUN.run_id, self.dhts and visible_maddrs(self.dhts[0]))
            p2p = await dht.replicate_p2p()
            server = StageServer(StageWorker(RUN, stage), NodeMetrics(), str(dht.peer_id))
            await serve(p2p, server, max_frame=server.max_frame)
            self.dhts.append(dht)
            self.p2ps.append(p2p)
            self.servers[stage] = server
        peers = [a for d in self.dhts for a in visible_maddrs(d)]
        self.attacker, self.honest = [await self._client(peers) for _ in range(2)]
        return self

    async def _client(self, peers):
        dht = start_dht(RUN.run_id, peers)
        p2p = await dht.replicate_p2p()
        self.dhts.append(dht)
        self.p2ps.append(p2p)
        return p2p

    async def stop(self):
        for p2p in self.p2ps:
            try:
                await p2p.shutdown()
            except Exception:
                pass
        for dht in self.dhts:
            dht.shutdown()
        self.janitor.sweep()

    async def raw(self, p2p, stage: int, body: bytes, declared=None) -> dict | None:
        server = self.servers[stage]
        size = len(body) if declared is None else (server.max_frame + 1 if declared == "over" else declared)
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(self.peer(stage)),
                                                                  HANDLER_NAME)
        try:
            writer.write(size.to_bytes(8, "big") + body)
            await writer.drain()
            return unpack(await asyncio.wait_for(read_frame(reader), 10))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        finally:
            writer.close()

    def peer(self, stage: int) -> str:
        return self.servers[stage].peer_id

    async def valid(self, p2p) -> dict:
        reply, _, _ = await call(p2p, self.peer(1), fwd(eval=True), timeout=10)
        return reply


async def refused(p2p, peer, msg) -> RemoteError:
    with pytest.raises(RemoteError) as err:
        await call(p2p, peer, msg, timeout=10)
    return err.value


def test_malformed_payloads_are_refused_counted_and_banned():
    async def go():
        h = await Harness().start()
        try:
            for server in h.servers.values():  # first: every case individually, no ban in the way
                server.bad_peers = BadPeerTracker(limit=10**9)
            reasons = {}
            for name, stage, msg, _ in MALFORMED:
                err = await refused(h.attacker, h.peer(stage), msg)
                reasons[name] = (err.reason, str(err))
            frames = {name: await h.raw(h.attacker, 1, body, declared) for name, body, declared in GARBAGE_FRAMES}
            counted = {m.name: m for m in h.servers[1].metrics.rejected.collect()}
            ok = await h.valid(h.honest)
            still = await h.valid(h.attacker)  # not banned with the lenient tracker: still served

            # then the real policy: 20 bad requests within a minute -> refused for a while
            h.servers[1].bad_peers = BadPeerTracker()
            for _ in range(20):
                await refused(h.attacker, h.peer(1), fwd(x=code(2, 32, 64)))
            banned = await refused(h.attacker, h.peer(1), fwd(eval=True))
            honest_after = await h.valid(h.honest)
            metrics = h.servers[1].metrics
            samples = {s.labels.get("reason"): s.value for m in metrics.rejected.collect() for s in m.samples
                       if s.name.endswith("_total")}
            bans = metrics.peer_bans._value.get()
            return reasons, frames, ok, still, banned, honest_after, samples, bans
        finally:
            await h.stop()

    reasons, frames, ok, still, banned, honest_after, samples, bans = asyncio.run(go())
    wrong = {name: reasons[name] for name, _, _, expected in MALFORMED if reasons[name][0] != expected}
    assert not wrong, wrong
    for name, (reason, text) in reasons.items():
        assert len(text) > len(reason) + 10, (name, text)  # says what was wrong, not just a code
    for name, reply in frames.items():
        assert reply is not None and reply["ok"] is False, (name, reply)
        assert reply["reason"] in ("malformed", "size"), (name, reply)
        assert reply["error"], name
    assert frames["frame over the node's limit"]["reason"] == "size"
    assert "exceeds this node's limit" in frames["frame of 1 TiB declared"]["error"]
    assert ok["ok"] and ok["y"]["shape"] == [2, 32, B]
    assert still["ok"]
    assert banned.reason == "state" and "too many bad requests" in str(banned)
    assert honest_after["ok"]
    assert bans == 1
    assert samples.get("banned", 0) >= 1
    for reason in ("codec", "shape", "nonfinite", "size", "malformed", "method", "fingerprint", "version"):
        assert samples.get(reason, 0) > 0, (reason, samples)


def test_memory_stays_bounded_under_500_bad_requests():
    async def go():
        h = await Harness().start()
        try:
            h.servers[1].bad_peers = BadPeerTracker(limit=10**9)  # every request reaches full validation
            big_garbage = os.urandom(h.servers[1].max_frame - 16)
            cases = [m for _, stage, m, _ in MALFORMED if stage == 1]
            for _ in range(20):  # warm up allocator, caches, the stream machinery
                await refused(h.attacker, h.peer(1), cases[0])
                await h.raw(h.attacker, 1, big_garbage)
            before = rss_mb()
            answered = 0
            for i in range(500):
                if i % 5 == 4:
                    reply = await h.raw(h.attacker, 1, big_garbage if i % 10 == 9 else b"\xc1" * 64)
                    assert reply is not None and reply["ok"] is False
                else:
                    await refused(h.attacker, h.peer(1), cases[i % len(cases)])
                if i % 100 == 99:
                    assert (await h.valid(h.honest))["ok"]
                    answered += 1
            after = rss_mb()
            return before, after, answered
        finally:
            await h.stop()

    before, after, answered = asyncio.run(go())
    assert answered == 5
    assert after - before < 100, f"RSS grew from {before:.0f} MB to {after:.0f} MB over 500 bad requests"


def test_frame_limit_follows_the_stage_schema():
    server = StageServer(StageWorker(RUN, 1), NodeMetrics())
    biggest_valid = pack(bwd(x=code(8, 32, B, codec="bf16"), grad_out=code(8, 32, B, codec="bf16")))
    assert len(biggest_valid) < server.max_frame < 4 << 20  # a few MiB at most, not the 64 MiB default


def test_head_refuses_bad_replies_and_retries_on_an_honest_replica():
    """A replica that answers with NaN codes or wrong shapes is treated like a failed one: the head
    bans it and the step completes on the honest replica, with a finite loss."""
    from node.inproc import InprocSwarm
    from swarm.data import ByteCorpus

    run = RunConfig(model=RUN.model, train=TrainConfig(batch_size=8, microbatches=4), run_id="badreply")

    async def go():
        async with InprocSwarm(run, ByteCorpus(max_bytes=1 << 20), replicas={1: 2}) as sw:
            bad = sw.servers[1][0]

            async def nan_forward(msg):
                shape = msg["x"]["shape"]
                return {"y": code(*shape, data=bf16_bits(0x7FC0, int(np.prod(shape))))}

            async def short_backward(msg):
                return {"grad_in": code(1, 32, B)}

            bad._on_forward, bad._on_backward = nan_forward, short_backward
            results = [await sw.head.train_step(s) for s in range(2)]
            return results, sw.head.retries, sw.servers[1][1].tokens_done

    results, retries, honest_tokens = asyncio.run(go())
    assert all(np.isfinite(r["loss"]) for r in results)
    assert retries > 0 and honest_tokens > 0
