"""Every call's way into a stage node, before the stage sees it, and its answer's way out.

A request is joined from its streamed parts (bounded by the stage's largest valid request), matched
with its description in protocol/contract.py, and checked against it (uid, method, envelope, fields,
tensors). A bad request is the sender's problem: it gets a refusal saying what was wrong, it is
counted by reason, a peer that keeps sending them is refused for a while, and everyone else is still
served. What the stage does with a good request is the `handle` callback's (node/stage_server.py).
"""
from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from node.admission import BadPeerTracker
from node.settings import ServeSettings
from protocol.contract import (METHODS, Method, check_envelope, check_fields, join_stream_parts, pack_meta, refusal,
                               stock_tensors, tensors_from_proto, tensors_to_proto, unpack_meta)
from protocol.errors import PayloadError

log = logging.getLogger(__name__)
STREAM_PART = 1 << 20  # bytes per part of a streamed reply
NOT_THE_PEERS_FAULT = ("busy", "deadline", "unavailable", "downstream")  # refusals that earn the caller no strike

# (method, fields, tensors, peer) -> (reply fields, reply tensors)
Handle = Callable[[Method, dict, dict, str], Awaitable[tuple[dict, dict]]]
# (method name, fields, tensors, reply tensors, request bytes, response bytes), once a call was answered
Served = Callable[[str, dict, dict, dict, int, int], None]


class RequestGate:
    """The checks and the bookkeeping every call of one stage's servicer goes through. `count_message`
    (direction, bytes, method) sees every message in and out; `on_served` every call answered."""

    def __init__(self, uid: str, index: int, methods: tuple[str, ...], fingerprint: str, max_request: int, metrics,
                 *, handle: Handle, on_served: Served, count_message: Callable[..., None],
                 serve: ServeSettings = ServeSettings()):
        self.uid, self.index, self.methods, self.fingerprint = uid, index, methods, fingerprint
        self.max_request, self.metrics = max_request, metrics
        self.handle, self.on_served, self.count_message = handle, on_served, count_message
        self.bad_peers = BadPeerTracker(serve.bad_requests, serve.bad_window_s, serve.bad_peer_ban_s)
        self.inflight = 0   # calls being served now
        self.requests = 0   # calls answered so far

    async def serve(self, name: str, request, context: P2PContext, error: PayloadError | None = None):
        peer = context.remote_id
        self.count_message("received", request.ByteSize(), name)
        stock = not request.metadata
        started = time.perf_counter()
        self.inflight += 1
        self.metrics.queue.set(self.inflight)
        try:
            if error is not None:
                raise error
            if self.bad_peers.is_banned(str(peer)):
                self.metrics.rejected.labels("banned").inc()
                return self._refuse("banned", "too many bad requests from your peer id; refused for a while", stock)
            method = self._method(name, stock)
            fields, tensors = self._parse(method, request, stock)
            reply_fields, reply_tensors = await self.handle(method, fields, tensors, str(peer))
            protos, index = tensors_to_proto(reply_tensors, runtime_pb2)
            response = runtime_pb2.ExpertResponse(tensors=protos,
                                                  metadata=pack_meta({"ok": True, "tensors": index, **reply_fields}))
            self.requests += 1
            self.on_served(name, fields, tensors, reply_tensors, request.ByteSize(), response.ByteSize())
        except PayloadError as e:
            self.rejected(e, peer)
            return self._refuse(e.reason, e.detail, stock)
        except Exception as e:  # our bug, not the peer's: report it, keep serving
            log.exception("stage %d failed on %s", self.index, name)
            return self._refuse("internal", f"{type(e).__name__}: {e}", stock)
        finally:
            self.inflight -= 1
            self.metrics.queue.set(self.inflight)
            self.metrics.rpc_seconds.labels(name).observe(time.perf_counter() - started)
        self.count_message("sent", response.ByteSize(), name)
        return response

    async def serve_stream(self, name: str, requests, context: P2PContext):
        """Streaming variant for large tensors: gather the parts (bounded), serve, split the reply."""
        request, error = await self._gather(requests)
        response = await self.serve(name, request, context, error)
        parts = [p for t in response.tensors for p in split_for_streaming(t, STREAM_PART)]
        yield runtime_pb2.ExpertResponse(tensors=parts[:1], metadata=response.metadata)
        for part in parts[1:]:
            yield runtime_pb2.ExpertResponse(tensors=[part])

    def rejected(self, err: PayloadError, peer) -> None:
        self.metrics.rejected.labels(err.reason).inc()
        if err.reason in NOT_THE_PEERS_FAULT:  # our capacity or our next hop: no strike against the caller
            return
        if self.bad_peers.record(str(peer)):
            self.metrics.peer_bans.inc()
            log.warning("peer %s sent too many bad requests; refusing it for %.0fs", peer, self.bad_peers.ban_s)

    def _refuse(self, reason: str, message: str, stock: bool):
        if stock:  # a stock hivemind client reads handler errors as text: make the text say it all
            raise PayloadError(reason, message)
        response = runtime_pb2.ExpertResponse(metadata=pack_meta(refusal(reason, message)))
        self.count_message("sent", response.ByteSize())
        return response

    async def _gather(self, requests) -> tuple[runtime_pb2.ExpertRequest, PayloadError | None]:
        """The streamed request joined into one, or what was wrong with it (uid and metadata of the
        first part are kept, so the refusal goes back the way the caller reads it)."""
        first, parts, total = None, [], 0
        try:
            async for req in requests:
                total += req.ByteSize()
                first = first or req
                if total > self.max_request:
                    raise PayloadError("size", f"streamed request exceeds this stage's limit of {self.max_request} "
                                               f"bytes")
                parts.extend(req.tensors)
            if first is None:
                raise PayloadError("malformed", "empty request stream")
        except PayloadError as e:
            head = runtime_pb2.ExpertRequest(uid=first.uid, metadata=first.metadata) if first else \
                runtime_pb2.ExpertRequest()
            return head, e
        return runtime_pb2.ExpertRequest(uid=first.uid, metadata=first.metadata, tensors=join_stream_parts(parts)), None

    def _method(self, name: str, stock: bool) -> Method:
        if name not in METHODS:  # hivemind's rpc_backward: a stock client's training call
            missing = "needs ExpertRequest.metadata and " if stock else ""
            raise PayloadError("method" if not stock else "metadata",
                               f"{name!r} is not served: training {missing}goes through rpc_train (one nested "
                               f"forward-then-backward call; see protocol/contract.py), so that every gradient "
                               f"belongs to a known microbatch of a known step")
        return METHODS[name]

    def _parse(self, method: Method, request, stock: bool) -> tuple[dict, dict]:
        if request.uid != self.uid:
            raise PayloadError("uid", f"this peer serves expert {self.uid!r}, not {request.uid!r}")
        if method.name not in self.methods:
            raise PayloadError("method", f"this node (stage {self.index}) serves only {', '.join(self.methods)}")
        if stock:
            if method.name != "forward":
                raise PayloadError("metadata", f"{method.name!r} needs ExpertRequest.metadata (msgpack: v, fp, "
                                               f"tensors and the call's fields; see protocol/contract.py)")
            return {"stock": True}, stock_tensors(request.tensors, ("x",))
        meta = unpack_meta(request.metadata)
        check_envelope(meta, self.fingerprint)
        fields = check_fields(method.fields, meta)
        return fields, tensors_from_proto(request.tensors, meta.get("tensors", []), method.tensor_names())
