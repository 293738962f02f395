"""Call a resbm-swarm stage with nothing but hivemind's public client API.

    python examples/stock_client.py --initial-peers /ip4/.../p2p/... --run-id my-run --stage 1 [--train] [--hostile]

1. Discover the stage's replicas with one DHT get of "<run_id>.<stage>". Records are owner-signed with
   Ed25519 (protocol/signing.py): each value ends in its signature, which a DHT must strip before it
   can decode the value, so the DHT gets a record validator: Ed25519Records below, 30 lines on
   hivemind's public RecordValidatorBase API and `cryptography` (which hivemind installs), which
   checks each signature and strips it.
2. Run an eval forward of a random (batch, seq_len, b) code through a stock `RemoteExpert`.
3. A stock backward through that RemoteExpert carries no metadata: the stage refuses it with a clear
   error (training goes through rpc_train) instead of counting it as some step's gradient.
4. With --train: one `rpc_train` call through the servicer stub (stage 1 only), with the metadata
   the stage needs (protocol version, run fingerprint, owner = this peer, step, microbatch, timeout;
   see protocol/contract.py) and the targets: the stage walks the code to the tail and back, and
   the reply holds the gradient of x and the route taken. Stage 1 takes a microbatch from its owner
   only, and only where the run lists no trainers or lists this peer.
5. With --hostile: NaN, inf, width b+1, int64, batch 10^5 and zero-length inputs; prints each refusal.

Prints one JSON object with what happened.
"""
import argparse
import asyncio
import base64
import dataclasses
import json
import re
import sys

import msgpack
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hivemind import DHT
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.moe.client.expert import RemoteExpert, get_server_stub
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

LOOPBACK = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False, use_relay=False,
                use_auto_relay=False)  # never probe beyond this host


class Ed25519Records(RecordValidatorBase):
    """resbm's owner-signed records: a record whose key or subkey holds "[ed25519:<key>]" (urlsafe base64
    of an Ed25519 public key) has a value that ends in "[ed25519-sig:<signature>]" (urlsafe base64), made
    by that key over msgpack((key, subkey, value without it, expiration)), as hivemind's own
    RSASignatureValidator signs. Checks it and strips it; records without the marker pass unchanged."""
    KEY, SIG = re.compile(rb"\[ed25519:(.*?)\]", re.S), re.compile(rb"\[ed25519-sig:(.*?)\]", re.S)

    def validate(self, record: DHTRecord) -> bool:
        keys = set(self.KEY.findall(record.key) + self.KEY.findall(record.subkey or b""))
        if not keys:
            return True
        signatures = self.SIG.findall(record.value)
        if len(keys) != 1 or len(signatures) != 1:
            return False
        unsigned = dataclasses.replace(record, value=self.strip_value(record))
        signed = MSGPackSerializer.dumps(dataclasses.astuple(unsigned))
        try:
            Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(keys.pop())).verify(
                base64.urlsafe_b64decode(signatures[0]), signed)
        except Exception:  # a bad signature, or a key or signature that does not decode
            return False
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        return self.SIG.sub(b"", record.value)

    @property
    def priority(self) -> int:
        return 10  # before any validator that decodes the value


def discover(dht: DHT, uid: str) -> list[dict]:
    found = dht.get(uid, latest=True)
    records = [item.value for item in (found.value.values() if found and isinstance(found.value, dict) else [])]
    return [r for r in records if isinstance(r, dict) and r.get("serving")]


def plain(t: torch.Tensor) -> runtime_pb2.Tensor:
    """A tensor as hivemind's NONE compression sends it (bf16 as 2 bytes per value)."""
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return runtime_pb2.Tensor(buffer=raw.numpy().tobytes(), size=list(t.shape), dtype=str(t.dtype)[6:])


def refusal_of(fn) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "accepted"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--initial-peers", nargs="+", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--stage", type=int, default=1)
    p.add_argument("--identity", default=None, help="libp2p identity file (to be listed as a trainer)")
    p.add_argument("--train", action="store_true")
    p.add_argument("--hostile", action="store_true")
    args = p.parse_args()

    dht = DHT(initial_peers=args.initial_peers, start=True, client_mode=True, identity_path=args.identity,
              record_validators=[Ed25519Records()], **LOOPBACK)
    out = {"uid": f"{args.run_id}.{args.stage}"}
    try:
        replicas = discover(dht, out["uid"])
        out["replicas"] = [r["peer_id"] for r in replicas]
        if not replicas:
            print(json.dumps(out))
            return 1
        peer = PeerID.from_base58(replicas[0]["peer_id"])
        p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
        expert = RemoteExpert(ExpertInfo(out["uid"], peer), p2p)
        info = expert.info["resbm"]  # the stage's own figures ride along in hivemind's expert info
        b, seq = info["code_width"], expert.info["forward_schema"][0][0].size[1]
        out.update(fingerprint=info["fingerprint"], code_width=b, stage_step=info["step"])

        x = torch.randn(2, seq, b)
        y = expert(x)
        out["eval_forward_shape"] = list(y.shape)
        out["stock_backward"] = refusal_of(lambda: y.sum().backward())

        stub = get_server_stub(p2p, peer)
        if args.train:
            out["train"] = train_call(p2p, peer, out["uid"], info, x)
        if args.hostile:
            out["hostile"] = hostile_calls(expert, stub, out["uid"], b, seq)
        print(json.dumps(out))
        return 0
    finally:
        dht.shutdown()


def _meta(info: dict, **fields) -> bytes:
    return msgpack.packb({"v": info["version"], "fp": info["fingerprint"], **fields})


def train_call(p2p, peer: PeerID, uid: str, info: dict, x: torch.Tensor) -> dict:
    """One microbatch from the stage to the tail and back: a single rpc_train call with metadata.
    ConnectionHandler's stub has no rpc_train, so the call goes by handler name through hivemind's
    P2P (the stage registers it under the same ConnectionHandler prefix)."""
    # the microbatch's name (owner, step, slot) is ours; in an open swarm (no --trainer list) the stages
    # train on it like any trainer's microbatch, while a run that lists its trainers refuses it
    step = info["step"] + 1
    targets = torch.zeros(x.shape[:2], dtype=torch.int32)  # token ids: i32 holds any vocabulary
    req = runtime_pb2.ExpertRequest(uid=uid, tensors=[plain(x.to(torch.bfloat16)), plain(targets)], metadata=_meta(
        info, owner=str(p2p.peer_id), step=step, micro=0, timeout_s=60.0,
        tensors=[["x", info["codec"], False], ["targets", "i32", False]]))
    reply = RemoteExpertWorker.run_coroutine(asyncio.wait_for(p2p.call_protobuf_handler(
        peer, "ConnectionHandler.rpc_train", req, runtime_pb2.ExpertResponse), 90))
    meta = msgpack.unpackb(reply.metadata)
    if not meta.get("ok"):
        return {"refused": meta}
    return {"loss": meta["loss"], "route": meta["route"], "grad_shape": list(reply.tensors[0].size),
            "grad_codec": meta["tensors"][0][1]}


def hostile_calls(expert, stub, uid: str, b: int, seq: int) -> dict:
    cases = {
        "nan": torch.full((2, seq, b), float("nan")),
        "inf": torch.full((2, seq, b), float("inf")),
        "width_b_plus_1": torch.randn(2, seq, b + 1),
        "int64": torch.zeros(2, seq, b, dtype=torch.int64),
        "batch_1e5": torch.randn(10 ** 5, 1, b),
        "zero_length": torch.randn(2, 0, b),
    }
    results = {}
    for name, t in cases.items():  # through the stub: RemoteExpert itself checks shapes client-side
        req = runtime_pb2.ExpertRequest(uid=uid, tensors=[plain(t)])
        results[name] = refusal_of(lambda: RemoteExpertWorker.run_coroutine(stub.rpc_forward(req)))
    return results


if __name__ == "__main__":
    sys.exit(main())
