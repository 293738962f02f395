"""Fuzzing live stages over real libp2p and hivemind's RPC: malformed requests of every kind are
refused with a clear reason before any compute, counted by reason, a persistent offender is banned,
honest peers keep being served, and memory stays bounded."""
import asyncio
import os

import msgpack
import numpy as np
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from node.client import StageClient
from node.dht import start_dht, visible_maddrs
from node.metrics import NodeMetrics
from node.runtime import SocketJanitor
from node.admission import BadPeerTracker
from node.stage_server import StageServer
from protocol import PROTOCOL_VERSION
from protocol.codec import encode, encode_ints
from protocol.contract import pack_meta, tensors_to_proto
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


def code(*shape, codec="bf16", data=None):
    return encode(torch.randn(*shape), codec) if data is None else {"codec": codec, "shape": list(shape), "data": data}


def bf16_bits(bits: int, n: int) -> bytes:
    return np.full(n, bits, dtype=np.uint16).tobytes()


def request(method: str, *, meta=None, protos=None, uid=None, stage=None, **fields):
    """(method, stage, ExpertRequest): fields that are codec dicts become tensors (as our client
    sends them); `meta`/`protos`/`uid` replace the well-formed parts with whatever a test wants."""
    tensors = {k: v for k, v in fields.items() if isinstance(v, dict)}
    plain = {k: v for k, v in fields.items() if not isinstance(v, dict)}
    built, index = tensors_to_proto(tensors, runtime_pb2)
    if meta is None:
        meta = {"v": PROTOCOL_VERSION, "fp": FP, "tensors": index, **plain}
    stage = 1 if stage is None else stage
    req = runtime_pb2.ExpertRequest(uid=uid if uid is not None else f"{RUN.run_id}.{stage}",
                                    tensors=built if protos is None else protos,
                                    metadata=meta if isinstance(meta, bytes) else pack_meta(meta))
    return method, stage, req


def fwd(**kw):
    return request("forward", **{"x": code(2, 32, B), **kw})


def targets(*shape, value=0):
    return encode_ints(torch.full(shape, value, dtype=torch.long), 256)


def train(owner: str | None, **kw):
    """A training call of `owner`'s microbatch (stage 1 takes it from its owner only)."""
    return request("train", **{"owner": owner, "step": 1, "micro": 0, "timeout_s": 10.0, "x": code(2, 32, B),
                               "targets": targets(2, 32), **kw})


def stock(*protos, method="forward"):
    """A request as a stock hivemind RemoteExpert sends it: no metadata, plain tensors."""
    return request(method, meta=b"", protos=list(protos))


def plain(t: torch.Tensor) -> runtime_pb2.Tensor:
    return runtime_pb2.Tensor(buffer=t.numpy().tobytes(), size=list(t.shape), dtype=str(t.dtype)[6:])


GOOD_INDEX = [["x", "bf16", False]]
X = tensors_to_proto({"x": code(2, 32, B)}, runtime_pb2)[0]
NAN = bf16_bits(0x7FC0, 2 * 32 * B)


def malformed_cases(me: str) -> list[tuple[str, tuple, str]]:
    """(name, request, expected reason) of malformed requests sent by the peer `me`."""
    return [
        ("wrong codec (dtype)", fwd(x=code(2, 32, B, codec="fp32")), "codec"),
        ("unknown codec", fwd(x=code(2, 32, B, codec="float64", data=b"\0" * 2 * 32 * B * 8)), "codec"),
        ("full-width tensor", fwd(x=code(2, 32, 64)), "shape"),
        ("2-d tensor", fwd(x=code(64, B)), "shape"),
        ("5-d tensor", fwd(x=code(1, 1, 2, 32, B)), "shape"),
        ("sequence too long", fwd(x=code(2, 33, B)), "shape"),
        ("batch over the limit", fwd(x=code(9, 32, B)), "size"),
        ("empty batch", fwd(x=code(0, 32, B, data=b"")), "shape"),
        ("NaN values", fwd(x=code(2, 32, B, data=NAN)), "nonfinite"),
        ("inf values", fwd(x=code(2, 32, B, data=bf16_bits(0x7F80, 2 * 32 * B))), "nonfinite"),
        ("-inf code to train", train(me, x=code(2, 32, B, data=bf16_bits(0xFF80, 2 * 32 * B))), "nonfinite"),
        ("data shorter than shape", fwd(x=code(2, 32, B, data=b"\0" * 10)), "size"),
        ("data longer than shape", fwd(x=code(2, 32, B, data=b"\0" * (2 * 32 * B * 2 + 2))), "size"),
        ("huge declared shape", fwd(x=code(10**6, 32, B, data=b"")), "size"),
        ("shape whose product overflows int64", fwd(x=code(2**32 - 1, 2**32 - 1, B, data=b"")), "size"),
        ("tensors index not a list", fwd(meta={"v": PROTOCOL_VERSION, "fp": FP, "tensors": "x"}, protos=X),
         "malformed"),
        ("tensors entry malformed", fwd(meta={"v": PROTOCOL_VERSION, "fp": FP, "tensors": [["x", 5]]}, protos=X),
         "malformed"),
        ("unexpected tensor name", fwd(meta={"v": PROTOCOL_VERSION, "fp": FP,
                                             "tensors": [["weights", "bf16", False]]}, protos=X), "malformed"),
        ("tensor announced, not sent", fwd(meta={"v": PROTOCOL_VERSION, "fp": FP, "tensors": GOOD_INDEX}, protos=[]),
         "malformed"),
        ("tensor sent, not announced", fwd(meta={"v": PROTOCOL_VERSION, "fp": FP, "tensors": []}, protos=X),
         "malformed"),
        ("missing x", request("forward"), "malformed"),
        ("forward on the last stage", fwd(stage=2), "method"),
        ("another stage's uid", fwd(uid=f"{RUN.run_id}.2"), "uid"),
        ("other run fingerprint", fwd(fp="0" * 16), "fingerprint"),
        ("other protocol version", fwd(v=PROTOCOL_VERSION + 7), "version"),
        ("metadata of random bytes", fwd(meta=os.urandom(256) + b"\xc1"), "malformed"),
        ("metadata is a msgpack list", fwd(meta=msgpack.packb([1, 2, 3])), "malformed"),
        ("metadata with int keys", fwd(meta=msgpack.packb({1: 2})), "malformed"),
        ("metadata over 64 KiB", fwd(meta=msgpack.packb({"pad": b"\0" * 70000})), "size"),
        # train: the nested walk of one microbatch, refused before any compute or next hop
        ("train of another owner's microbatch", train("QmSomeoneElse"), "forbidden"),
        ("train without owner", train(None), "malformed"),
        ("timeout_s zero", train(me, timeout_s=0.0), "malformed"),
        ("timeout_s over an hour", train(me, timeout_s=1e9), "malformed"),
        ("timeout_s NaN", train(me, timeout_s=float("nan")), "malformed"),
        ("timeout_s a string", train(me, timeout_s="10"), "malformed"),
        ("train without targets", train(me, targets=None), "malformed"),
        ("targets shape differs from x", train(me, targets=targets(2, 31)), "shape"),
        ("train code of the wrong width", train(me, x=code(2, 32, B + 1)), "shape"),
        ("step is a string", train(me, step="1"), "malformed"),
        ("negative micro", train(me, micro=-1), "malformed"),
        ("micro beyond the step's microbatches", train(me, micro=10**6), "malformed"),
        ("eval not a bool", train(me, eval="yes"), "malformed"),
        ("token id beyond vocab", train(me, targets={"codec": "u16", "shape": [2, 32],
                                                     "data": np.full(64, 300, np.uint16).tobytes()}), "token_range"),
        ("negative token id", train(me, targets={"codec": "i32", "shape": [2, 32],
                                                 "data": np.full(64, -1, np.int32).tobytes()}), "token_range"),
        ("backward with metadata", request("backward", x=code(2, 32, B)), "method"),
        # a trainer serves only its state
        ("train to a trainer", train(me, stage=0), "method"),
        ("state at a negative offset", request("state", stage=0, offset=-1), "malformed"),
        ("stock request without tensors", stock(), "malformed"),
        ("stock int64 tensor", stock(plain(torch.zeros(2, 32, B, dtype=torch.int64))), "codec"),
        ("stock backward without metadata", stock(plain(torch.zeros(2, 32, B)), plain(torch.zeros(2, 32, B)),
                                                  method="backward"), "metadata"),
    ]


class Harness:
    def __init__(self):
        self.janitor = SocketJanitor()
        self.dhts, self.p2ps, self.servers = [], [], {}

    async def start(self):
        for stage in (0, 1, 2):
            dht = start_dht(RUN.run_id, self.dhts and visible_maddrs(self.dhts[0]))
            p2p = await dht.replicate_p2p()
            server = StageServer(StageWorker(RUN, stage), NodeMetrics(), str(dht.peer_id))
            await server.add_p2p_handlers(p2p)
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

    async def send(self, p2p, case) -> dict | str:
        """Send one raw request; the refusal's metadata, or the handler's error text for stock requests."""
        from protocol.contract import unpack_meta
        method, stage, req = case
        stub = StageServer.get_stub(p2p, PeerID.from_base58(self.peer(stage)))
        try:
            reply = await getattr(stub, f"rpc_{method}")(req, timeout=10)
        except Exception as e:  # a stock request's refusal comes back as the handler's error text
            return str(e)
        return unpack_meta(reply.metadata, 1 << 24)

    def peer(self, stage: int) -> str:
        return self.servers[stage].peer_id

    async def valid(self, p2p) -> dict:
        reply, _, _ = await StageClient(p2p, RUN).call(self.peer(1), 1, "forward", x=code(2, 32, B), timeout=10)
        return reply


def reason_of(reply) -> tuple[str, str]:
    if isinstance(reply, str):  # stock: "PayloadError: <reason>: <message>" inside the handler error
        for reason in ("metadata", "codec", "malformed", "shape", "size", "banned", "method"):
            if f"{reason}:" in reply:
                return reason, reply
        return "?", reply
    assert reply.get("ok") is False, reply
    return reply["reason"], reply["error"]


def test_malformed_payloads_are_refused_counted_and_banned():
    async def go():
        h = await Harness().start()
        try:
            for server in h.servers.values():  # first: every case individually, no ban in the way
                server.gate.bad_peers = BadPeerTracker(limit=10**9)
            cases = malformed_cases(str(h.attacker.peer_id))
            reasons = {name: reason_of(await h.send(h.attacker, case)) for name, case, _ in cases}
            ok = await h.valid(h.honest)
            still = await h.valid(h.attacker)  # not banned with the lenient tracker: still served

            # then the real policy: 20 bad requests within a minute -> refused for a while
            h.servers[1].gate.bad_peers = BadPeerTracker()
            for _ in range(20):
                await h.send(h.attacker, fwd(x=code(2, 32, 64)))
            banned = reason_of(await h.send(h.attacker, fwd()))
            honest_after = await h.valid(h.honest)
            metrics = h.servers[1].metrics
            samples = {s.labels.get("reason"): s.value for m in metrics.rejected.collect() for s in m.samples
                       if s.name.endswith("_total")}
            bans = metrics.peer_bans._value.get()
            samples0 = {s.labels.get("reason"): s.value for m in h.servers[0].metrics.rejected.collect()
                        for s in m.samples if s.name.endswith("_total")}
            return cases, reasons, ok, still, banned, honest_after, samples, samples0, bans
        finally:
            await h.stop()

    cases, reasons, ok, still, banned, honest_after, samples, samples0, bans = asyncio.run(go())
    wrong = {name: reasons[name] for name, _, expected in cases if reasons[name][0] != expected}
    assert not wrong, wrong
    for name, (reason, text) in reasons.items():
        assert len(text) > len(reason) + 10, (name, text)  # says what was wrong, not just a code
    assert "needs ExpertRequest.metadata and goes through rpc_train" in reasons["stock backward without metadata"][1]
    assert "goes through rpc_train" in reasons["backward with metadata"][1]
    assert "from its owner only" in reasons["train of another owner's microbatch"][1]
    assert ok["y"]["shape"] == [2, 32, B]
    assert still["y"]["shape"] == [2, 32, B]
    assert banned[0] == "banned" and "too many bad requests" in banned[1]
    assert honest_after["y"]["shape"] == [2, 32, B]
    assert bans == 1
    assert samples.get("banned", 0) >= 1
    for reason in ("codec", "shape", "nonfinite", "size", "malformed", "method", "fingerprint", "version", "uid",
                   "metadata", "forbidden", "token_range"):
        assert samples.get(reason, 0) > 0, (reason, samples)
    assert samples0.get("method", 0) >= 1 and samples0.get("malformed", 0) >= 1, samples0  # at the trainer


def test_memory_stays_bounded_under_500_bad_requests():
    async def go():
        h = await Harness().start()
        try:
            h.servers[1].gate.bad_peers = BadPeerTracker(limit=10**9)  # every request reaches full validation
            big = fwd(x=code(2, 32, B, data=os.urandom(3 << 20)))  # near the 4 MiB message limit
            cases = [case for _, case, _ in malformed_cases(str(h.attacker.peer_id)) if case[1] == 1]
            for _ in range(20):  # warm up allocator, caches, the stream machinery
                await h.send(h.attacker, cases[0])
                await h.send(h.attacker, big)
            before = rss_mb()
            answered = 0
            for i in range(500):
                reply = await h.send(h.attacker, big if i % 10 == 9 else cases[i % len(cases)])
                assert reason_of(reply)[0] != "?"
                if i % 100 == 99:
                    assert (await h.valid(h.honest))["y"]
                    answered += 1
            after = rss_mb()
            return before, after, answered
        finally:
            await h.stop()

    before, after, answered = asyncio.run(go())
    assert answered == 5
    assert after - before < 100, f"RSS grew from {before:.0f} MB to {after:.0f} MB over 500 bad requests"


def test_request_limit_follows_the_stage_schema():
    server = StageServer(StageWorker(RUN, 1), NodeMetrics())
    biggest_valid = train("QmOwner", x=code(8, 32, B, codec="bf16"), targets=targets(8, 32))[2].ByteSize()
    assert biggest_valid < server.gate.max_request < 4 << 20  # a few MiB at most


def test_trainer_refuses_bad_replies_and_reroutes_to_an_honest_replica():
    """A stage-1 replica that answers `train` with NaN gradients, gradients of the wrong shape or a
    route that does not reach the tail is treated like a failed one: the trainer's NextHop bans it
    and sends the microbatch to the honest replica, and every step finishes with a finite loss."""
    from bench.inproc import InprocSwarm
    from swarm.data import ByteCorpus

    run = RunConfig(model=RUN.model, train=TrainConfig(batch_size=8, microbatches=4), run_id="badreply")
    lies = []

    async def go():
        async with InprocSwarm(run, ByteCorpus(max_bytes=1 << 20), replicas={1: 2}) as sw:
            liar, honest = sw.servers[1]

            async def lying_train(fields, tensors, peer):
                shape = tensors["x"]["shape"]
                kind = ("nan", "short", "route")[len(lies) % 3]
                lies.append(kind)
                grad = {"nan": code(*shape, data=bf16_bits(0x7FC0, int(np.prod(shape)))),
                        "short": code(1, *shape[1:])}.get(kind, code(*shape))
                route = [liar.peer_id] if kind == "route" else [liar.peer_id, sw.servers[2][0].peer_id]
                return {"loss": 1.0, "route": route}, {"grad_in": grad}

            liar.handlers["train"] = lying_train
            trainer = sw.trainers[0]
            results = []
            for step in range(3):
                trainer.hop.router.stages[1][liar.peer_id].banned_until = 0.0  # lie again, in the next way
                results += (await sw.train(1))[0]
            return results, trainer.hop.retries, trainer.skipped, honest.tokens_done

    results, retries, skipped, honest_tokens = asyncio.run(go())
    assert [r.step for r in results] == [0, 1, 2] and all(np.isfinite(r.loss) for r in results), results
    assert set(lies) == {"nan", "short", "route"} and retries >= len(lies) and skipped == 0
    assert honest_tokens > 0


def test_streamed_requests_are_served_and_bounded():
    """The _stream variants (what hivemind clients use above 2 MiB): parts are joined and served like
    a unary call; a stream longer than the stage's request limit is refused with `size`."""
    from hivemind.utils.streaming import split_for_streaming
    from protocol.contract import unpack_meta

    async def stream(h, req, chunk):
        parts = [p for t in req.tensors for p in split_for_streaming(t, chunk)]
        msgs = [runtime_pb2.ExpertRequest(uid=req.uid, metadata=req.metadata, tensors=parts[:1])] + \
               [runtime_pb2.ExpertRequest(uid=req.uid, tensors=[p]) for p in parts[1:]]

        async def gen():
            for m in msgs:
                yield m
        stub = StageServer.get_stub(h.attacker, PeerID.from_base58(h.peer(1)))
        replies = [r async for r in await stub.rpc_forward_stream(gen())]
        return unpack_meta(replies[0].metadata), [t for r in replies for t in r.tensors]

    async def go():
        h = await Harness().start()
        try:
            ok = await stream(h, fwd()[2], 100)
            too_big = await stream(h, fwd(x=code(2, 32, B, data=os.urandom(h.servers[1].gate.max_request)))[2], 1 << 20)
            return ok, too_big
        finally:
            await h.stop()

    (meta, tensors), (refused, _) = asyncio.run(go())
    assert meta["ok"] is True and [list(t.size) for t in tensors][:1] == [[2, 32, B]]
    assert refused["ok"] is False and refused["reason"] == "size" and "limit" in refused["error"]
