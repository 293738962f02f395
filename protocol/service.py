"""The RPCs a stage replica answers, as hivemind sees them: the servicer type whose stub callers use
(node/client.py) and which node/stage_server.py implements. Handler names are hivemind
ConnectionHandler's, so a stock RemoteExpert reaches rpc_info / rpc_forward / rpc_backward; the
project's own calls (train, state) sit beside them. protocol/contract.py describes every call's fields."""
from __future__ import annotations

from typing import AsyncIterator

from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2


class StageService(ServicerBase):
    @classmethod
    def _get_handle_name(cls, namespace, method_name: str) -> str:
        name = f"ConnectionHandler.{method_name}"  # the names a stock hivemind client calls
        return f"{namespace}::{name}" if namespace is not None else name

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        raise NotImplementedError

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_forward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                                 context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield

    async def rpc_backward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                                  context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield

    async def rpc_train(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_train_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                               context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield

    async def rpc_state(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError


# A call's stub methods, by contract name: unary, and streamed (for requests above p2pd's message limit).
UNARY = {"forward": lambda stub: stub.rpc_forward, "train": lambda stub: stub.rpc_train,
         "state": lambda stub: stub.rpc_state}
STREAMED = {"forward": lambda stub: stub.rpc_forward_stream, "train": lambda stub: stub.rpc_train_stream}
