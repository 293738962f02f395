"""Request/response over libp2p streams: one msgpack frame each way (see protocol.messages)."""
from __future__ import annotations

import asyncio
import logging

from hivemind.p2p import P2P, PeerID

from protocol.errors import PayloadError
from protocol.messages import HANDLER_NAME, DEFAULT_MAX_FRAME, error_reply, pack, read_frame, unpack, write_frame

log = logging.getLogger(__name__)


class RemoteError(RuntimeError):
    """The peer answered, and refused: `reason` says why (a PayloadError reason or "internal")."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class PeerUnavailable(ConnectionError):
    """The peer did not answer (gone, unreachable, or too slow)."""


async def serve(p2p: P2P, service, *, max_frame: int = DEFAULT_MAX_FRAME, read_timeout: float = 60.0) -> None:
    """Route incoming streams to `service.handle(msg, peer_id) -> reply dict`.

    A request that cannot be read or parsed never reaches `handle`: it is reported to
    `service.rejected(error, peer_id)` and answered with an error reply (while the stream still
    works). Nothing a peer sends can raise out of here."""

    async def on_stream(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        peer = info.peer_id
        try:
            try:
                data = await asyncio.wait_for(read_frame(reader, max_frame), read_timeout)
                service.count_frame("received", len(data) + 8)
                reply = await service.handle(unpack(data), peer)
            except PayloadError as e:
                service.rejected(e, peer)
                reply = error_reply(e.reason, e.detail)
            except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                return
            out = pack(reply)
            await write_frame(writer, out)
            service.count_frame("sent", len(out) + 8)
            # Closing our end while the reply is still in flight makes p2pd reset the stream and the
            # caller reads a truncated frame (seen on rate-limited links): let the caller close first.
            await asyncio.wait_for(reader.read(1), read_timeout)
        except Exception:  # a broken stream must not take the node down
            log.debug("stream from %s failed", peer, exc_info=True)
        finally:
            writer.close()

    await p2p.add_binary_stream_handler(HANDLER_NAME, on_stream)


async def call(p2p: P2P, peer_id: PeerID | str, msg: dict, *, timeout: float = 30.0,
               max_frame: int = DEFAULT_MAX_FRAME) -> tuple[dict, int, int]:
    """Send one request; returns (reply, bytes sent, bytes received). Raises RemoteError when the
    peer refused, PeerUnavailable when it did not answer within `timeout`."""
    if isinstance(peer_id, str):
        peer_id = PeerID.from_base58(peer_id)
    payload = pack(msg)
    writer = None
    try:
        async with asyncio.timeout(timeout):
            _, reader, writer = await p2p.call_binary_stream_handler(peer_id, HANDLER_NAME)
            await write_frame(writer, payload)
            data = await read_frame(reader, max_frame)
    except (asyncio.TimeoutError, TimeoutError) as e:
        raise PeerUnavailable(f"peer {peer_id} did not answer within {timeout:.0f}s") from e
    except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
        raise PeerUnavailable(f"peer {peer_id} is unreachable: {type(e).__name__}: {e}") from e
    except Exception as e:  # p2pd reports dial failures as its own error types
        if isinstance(e, PayloadError):
            raise RemoteError(e.reason, e.detail) from e
        raise PeerUnavailable(f"peer {peer_id}: {type(e).__name__}: {e}") from e
    finally:
        if writer is not None:
            writer.close()
    reply = unpack(data)
    if reply.get("ok") is not True:
        raise RemoteError(str(reply.get("reason", "internal")), str(reply.get("error", "no message")))
    return reply, len(payload) + 8, len(data) + 8
