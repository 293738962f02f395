"""Calling a stage replica: one place that builds requests from protocol/contract.py, checks every
reply against it, and counts the bytes of every message both ways."""
from __future__ import annotations

import asyncio
import math

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.control import MAX_UNARY_PAYLOAD_SIZE
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming

from protocol import PROTOCOL_VERSION
from protocol.codec import decode, payload_nbytes
from protocol.contract import (INT_TENSORS, METHODS, STATE_CHUNK, check_fields, join_stream_parts, pack_meta,
                               tensors_from_proto, tensors_to_proto, unpack_meta)
from protocol.errors import PayloadError, PeerUnavailable, RemoteError
from protocol.records import stage_key  # a stage's DHT key is also its hivemind expert uid
from protocol.service import STREAMED, UNARY, StageService

REPLY_METADATA_LIMIT = STATE_CHUNK + (1 << 16)


class StageClient:
    def __init__(self, p2p: P2P, run):
        self.p2p, self.run = p2p, run
        self.stub_type = StageService
        self.fingerprint = run.fingerprint
        self.codecs = {"y": run.model.wire_codec, "grad_in": run.model.wire_codec_bwd}

    async def call(self, peer_id: PeerID | str, stage: int, method: str, *, timeout: float = 30.0,
                   **fields) -> tuple[dict, int, int]:
        """Call `method` on a replica of `stage`; fields that are codec dicts travel as tensors.
        Returns (reply fields and decoded-later codec dicts, bytes sent, bytes received). Raises
        RemoteError when the peer refused or answered something the contract does not allow,
        PeerUnavailable when it did not answer within `timeout`."""
        spec = METHODS[method]
        names = {n for n, _ in spec.tensor_names()}
        tensors = {k: v for k, v in fields.items() if k in names}
        meta = {k: v for k, v in fields.items() if k not in names}
        protos, index = tensors_to_proto(tensors, runtime_pb2)
        request = runtime_pb2.ExpertRequest(uid=stage_key(self.run.run_id, stage), tensors=protos, metadata=pack_meta(
            {"v": PROTOCOL_VERSION, "fp": self.fingerprint, "tensors": index, **meta}))
        peer = PeerID.from_base58(peer_id) if isinstance(peer_id, str) else peer_id
        stub = self.stub_type.get_stub(self.p2p, peer)
        sent = request.ByteSize()
        try:
            async with asyncio.timeout(timeout):
                response = await self._send(stub, method, request)
        except (asyncio.TimeoutError, TimeoutError) as e:
            raise PeerUnavailable(f"peer {peer} did not answer {method} within {timeout:.0f}s") from e
        except Exception as e:  # p2pd reports dial failures and handler errors as its own error types
            raise PeerUnavailable(f"peer {peer}: {type(e).__name__}: {e}") from e
        reply = self._check(method, response, tensors, meta)
        # codec bytes alone, beside the whole messages: what the metadata and framing cost is visible
        reply["payload"] = (sum(payload_nbytes(t) for t in tensors.values()),
                            sum(payload_nbytes(reply[n]) for n, _ in spec.tensor_names(reply=True) if n in reply))
        return reply, sent, response.ByteSize()

    async def info(self, peer_id: PeerID | str, stage: int, timeout: float = 10.0) -> dict:
        """The stage's own figures from hivemind's rpc_info (step, bytes, tokens, throughput, ...)."""
        peer = PeerID.from_base58(peer_id) if isinstance(peer_id, str) else peer_id
        stub = self.stub_type.get_stub(self.p2p, peer)
        try:
            reply = await stub.rpc_info(runtime_pb2.ExpertUID(uid=stage_key(self.run.run_id, stage)), timeout=timeout)
            info = MSGPackSerializer.loads(reply.serialized_info)
        except (asyncio.TimeoutError, TimeoutError) as e:
            raise PeerUnavailable(f"peer {peer} did not answer info within {timeout:.0f}s") from e
        except Exception as e:
            raise PeerUnavailable(f"peer {peer}: {type(e).__name__}: {e}") from e
        if not isinstance(info, dict) or not isinstance(info.get("resbm"), dict):
            raise RemoteError("internal", f"peer {peer} is not a resbm stage (info without 'resbm')")
        return info["resbm"]

    async def _send(self, stub, method: str, request):
        if request.ByteSize() <= MAX_UNARY_PAYLOAD_SIZE or method not in STREAMED:
            return await UNARY[method](stub)(request)
        parts = [p for t in request.tensors for p in split_for_streaming(t, 1 << 20)]
        msgs = [runtime_pb2.ExpertRequest(uid=request.uid, metadata=request.metadata, tensors=parts[:1])] + \
               [runtime_pb2.ExpertRequest(uid=request.uid, tensors=[p]) for p in parts[1:]]

        async def requests():
            for m in msgs:
                yield m
        first, received = None, []
        async for reply in await STREAMED[method](stub)(requests()):
            first = first or reply
            received.extend(reply.tensors)
        return runtime_pb2.ExpertResponse(metadata=first.metadata if first else b"",
                                          tensors=join_stream_parts(received))

    def _check(self, method: str, response, sent_tensors: dict, sent_fields: dict) -> dict:
        """A replica's answer must be what the contract promises: the reply's fields, and codes or
        gradients in the swarm's codecs, of the request's shape, finite."""
        spec = METHODS[method]
        try:
            meta = unpack_meta(response.metadata, REPLY_METADATA_LIMIT)
            if meta.get("ok") is not True:
                raise RemoteError(str(meta.get("reason", "internal")), str(meta.get("error", "no message")))
            reply = {**meta, **check_fields(spec.reply_fields, meta)}
            tensors = tensors_from_proto(response.tensors, meta.get("tensors", []), spec.tensor_names(reply=True))
            shape = next((t["shape"] for n, t in sent_tensors.items() if n not in INT_TENSORS), None)
            reply["decoded"] = {}  # checked once here; callers use these instead of decoding again
            for name, msg in tensors.items():
                t = decode(msg, expect_codec=self.codecs.get(name), width=self.run.model.code_width,
                           max_elems=math.prod(shape) if shape else 0)
                if shape is not None and list(t.shape) != list(shape):
                    raise PayloadError("shape", f"{name} has shape {list(t.shape)}, expected {list(shape)}")
                reply[name], reply["decoded"][name] = msg, t
            if method == "train" and not sent_fields.get("eval") and "grad_in" not in reply:
                raise PayloadError("malformed", "a training reply must carry grad_in")
        except PayloadError as e:
            raise RemoteError("internal", f"bad reply to {method}: {e}") from e
        return reply
