"""RPC messages between peers: msgpack maps in length-prefixed frames on a libp2p stream.

Every request carries the protocol version and the run fingerprint; a peer of another run or
version is refused with an error that says so. Frames larger than the receiver's limit are refused
before they are read, so a peer cannot make a node allocate unbounded memory.

Methods (request fields -> response fields; tensors are protocol.codec dicts):
    forward   step, micro, x [, tokens]                   -> y
    backward  step, micro, x, grad_out [, tokens]         -> grad_in
    loss      step, micro, x, targets, scale [, tokens]   -> loss, grad_in    (last stage only)
    prepare   step [, discard]                            -> held (microbatches whose gradients are here)
    step      step [, expect]                             -> applied, grad_norm, micro_count, mismatch
    info      -                                           -> stage, step, fingerprint, version, bytes...
    state     offset                                      -> step, total, data (a chunk of the serialized
                                                             stage state, for a joining replica)
Errors: {"ok": False, "reason": <PayloadError reason or "internal">, "error": <message>}
"""
from __future__ import annotations

import asyncio

import msgpack

from protocol import PROTOCOL_VERSION
from protocol.errors import PayloadError

HANDLER_NAME = "resbm.rpc"
METHODS = ("forward", "backward", "loss", "prepare", "step", "info", "state")
TRAINER_METHODS = ("forward", "backward", "loss", "prepare", "step")  # only a run's trainers may call these
STATE_CHUNK = 4 << 20
HEADER_BYTES = 8
DEFAULT_MAX_FRAME = 64 << 20


def pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> dict:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:
        raise PayloadError("malformed", f"not a msgpack message ({type(e).__name__})") from e
    if not isinstance(obj, dict):
        raise PayloadError("malformed", f"a message must be a map, got {type(obj).__name__}")
    return obj


def request(method: str, fingerprint: str, **fields) -> dict:
    return {"v": PROTOCOL_VERSION, "fp": fingerprint, "method": method, **fields}


def check_request(msg: dict, fingerprint: str) -> str:
    """Validates the envelope; returns the method name."""
    if msg.get("v") != PROTOCOL_VERSION:
        raise PayloadError("version", f"protocol version {msg.get('v')!r} is not ours ({PROTOCOL_VERSION}); "
                                      f"upgrade the older peer")
    if msg.get("fp") != fingerprint:
        raise PayloadError("fingerprint", f"run fingerprint {msg.get('fp')!r} differs from ours ({fingerprint}): "
                                          f"this peer belongs to another run config")
    method = msg.get("method")
    if method not in METHODS:
        raise PayloadError("method", f"unknown method {method!r}")
    return method


def field(msg: dict, key: str, kind, *, minimum=None):
    value = msg.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise PayloadError("malformed", f"field {key!r} must be {getattr(kind, '__name__', kind)}, "
                                        f"got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise PayloadError("malformed", f"field {key!r} must be >= {minimum}, got {value}")
    return value


def error_reply(reason: str, message: str) -> dict:
    return {"ok": False, "reason": reason, "error": message}


async def write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(len(payload).to_bytes(HEADER_BYTES, "big"))
    writer.write(payload)
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = DEFAULT_MAX_FRAME) -> bytes:
    size = int.from_bytes(await reader.readexactly(HEADER_BYTES), "big")
    if size > max_bytes:
        raise PayloadError("size", f"frame of {size} bytes exceeds this node's limit of {max_bytes}")
    return await reader.readexactly(size)
