"""The wire contract of a stage: every call, its fields and tensors, in one table that the server
(node/stage_server.py) and the caller (node/client.py) both use.

Transport: hivemind's protobuf RPC. A stage answers under ConnectionHandler's handler names, so a
stock hivemind client reaches `rpc_info`, `rpc_forward` and `rpc_backward`; the project's own calls
are further `rpc_*` handlers of the same servicer.

    ExpertRequest   uid = "<run_id>.<stage>", tensors, metadata = msgpack map
                    {"v": protocol version, "fp": run fingerprint, "tensors": [[name, codec, scaled], ...],
                     <the method's fields>}
    ExpertResponse  tensors, metadata = {"ok": True, "tensors": [...], <reply fields>}
                                     or {"ok": False, "reason": <reason>, "error": <message>}

A tensor is the project's codec bytes (protocol/codec.py) in a `runtime_pb2.Tensor` with compression
NONE and the payload's torch dtype name (bf16 travels as 2 bytes per value); codecs with scales add
a second Tensor holding the scale bytes right after it. A request without metadata comes from a
stock hivemind client: it may only run an eval forward on plain float tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgpack

from protocol import PROTOCOL_VERSION
from protocol.errors import PayloadError

# tensor names -> what they hold; every other tensor name is a code or a code's gradient
INT_TENSORS = ("tokens", "targets")
STATE_CHUNK = 2 << 20        # bytes of serialized state per `state` reply (unary messages stay < 4 MiB)
MAX_METADATA = 1 << 16       # bytes of msgpack metadata a request may carry
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn", "int8": "int8",
           "int8ch": "int8", "int4": "uint8", "int4ch": "uint8", "u8": "uint8", "u16": "uint16", "i32": "int32"}  # int4*: packed
STOCK_CODECS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # what a stock client may send


@dataclass(frozen=True)
class Field:
    kind: type
    required: bool = True
    default: object = None
    minimum: float | None = None
    maximum: float | None = None
    items: type | None = int        # lists: the kind of every item (None: any; checked by the handler)

    def check(self, name: str, value):
        if value is None:
            if self.required:
                raise PayloadError("malformed", f"field {name!r} is missing")
            return self.default
        ok = isinstance(value, self.kind) and not (isinstance(value, bool) and self.kind is not bool)
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise PayloadError("malformed", f"field {name!r} must be {self.kind.__name__}, got {type(value).__name__}")
        if self.kind is float and not math.isfinite(value):
            raise PayloadError("malformed", f"field {name!r} must be finite, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise PayloadError("malformed", f"field {name!r} must be >= {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise PayloadError("malformed", f"field {name!r} must be <= {self.maximum}, got {value}")
        if self.kind is list and self.items is not None and \
                not all(isinstance(v, self.items) and not isinstance(v, bool) for v in value):
            raise PayloadError("malformed", f"field {name!r} must be a list of {self.items.__name__}s")
        return value


def _int(minimum=0, **kw) -> Field:
    return Field(int, minimum=minimum, **kw)


def _flag() -> Field:
    return Field(bool, required=False, default=False)


@dataclass(frozen=True)
class Method:
    name: str
    fields: dict = field(default_factory=dict)
    tensors: tuple = ()             # request tensors; a trailing "?" marks an optional one
    reply_fields: dict = field(default_factory=dict)
    reply_tensors: tuple = ()

    def tensor_names(self, reply: bool = False) -> tuple[tuple[str, bool], ...]:
        return tuple((n.rstrip("?"), n.endswith("?")) for n in (self.reply_tensors if reply else self.tensors))


# A microbatch is named by (owner trainer, the owner's step, slot): for logs and authorization only.
_KEY = {"owner": Field(str), "step": _int(), "micro": _int()}
METHODS = {m.name: m for m in (
    # eval only: what a stock hivemind client (no metadata) and anyone else may run
    Method("forward", {}, ("x", "tokens?"), {}, ("y",)),
    # training: the nested forward-then-backward walk of one microbatch from this stage to the tail.
    # The reply carries the gradient of x and the route taken (peer ids of this stage .. the tail).
    Method("train", {**_KEY, "eval": _flag(), "timeout_s": Field(float, minimum=0.01, maximum=3600.0)},
           ("x", "targets", "tokens?"), {"loss": Field(float), "route": Field(list, items=str)}, ("grad_in?",)),
    # a joiner's state download: the first call (no `snapshot`) makes the replica serialize its state once and
    # name that snapshot; later calls name it and read on from `offset`, however many steps the replica applies
    # meanwhile. A replica that no longer holds the snapshot refuses with "unavailable" (start again). A peer
    # without snapshots (older) leaves the field out; its caller restarts when step or size change.
    Method("state", {"offset": _int(), "snapshot": Field(str, required=False, default="")}, (),
           {"step": _int(-1), "total": _int(), "data": Field(bytes), "snapshot": Field(str, required=False, default="")}),
)}
# `info` is hivemind's own rpc_info (ExpertUID -> ExpertInfo): the stock schema plus our stage's figures.

# Peer calls: a node's own p2p handlers (ExpertRequest/ExpertResponse with msgpack metadata, as above, but no
# stage uid and no run fingerprint: only "v"), served by every public node (node/dht.py).
DIALBACK_HANDLER = "resbm.dialback"
PEER_METHODS = {m.name: m for m in (
    # reachability probe: dial the caller back at each address it connected from (never elsewhere), at each
    # of its listening `ports`; `dialed` lists the "ip:port" that answered, `observed` the caller's addresses
    Method("dialback", {"ports": Field(list)}, (), {"dialed": Field(list, items=str), "observed": Field(list, items=str)}),
)}


def pack_meta(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack_meta(data: bytes, limit: int = MAX_METADATA) -> dict:
    if len(data) > limit:
        raise PayloadError("size", f"metadata of {len(data)} bytes exceeds the limit of {limit}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:
        raise PayloadError("malformed", f"metadata is not a msgpack map ({type(e).__name__})") from e
    if not isinstance(obj, dict):
        raise PayloadError("malformed", f"metadata must be a map, got {type(obj).__name__}")
    return obj


def check_fields(spec: dict, meta: dict) -> dict:
    return {name: f.check(name, meta.get(name)) for name, f in spec.items()}


def check_envelope(meta: dict, fingerprint: str) -> None:
    if meta.get("v") != PROTOCOL_VERSION:
        raise PayloadError("version", f"protocol version {meta.get('v')!r} is not ours ({PROTOCOL_VERSION}); "
                                      f"upgrade the older peer")
    if meta.get("fp") != fingerprint:
        raise PayloadError("fingerprint", f"run fingerprint {meta.get('fp')!r} differs from ours ({fingerprint}): "
                                          f"this peer belongs to another run config")


# --- tensors <-> protobuf -------------------------------------------------------------------------
def tensors_to_proto(tensors: dict, runtime_pb2) -> tuple[list, list]:
    """{name: codec dict} -> (protobuf Tensors, the metadata entry that says how to read them back)."""
    protos, index = [], []
    for name, msg in tensors.items():
        if msg is None:
            continue
        codec = msg["codec"]
        protos.append(runtime_pb2.Tensor(buffer=msg["data"], size=msg["shape"], dtype=_DTYPES.get(codec, "uint8")))
        scaled = "scale" in msg
        if scaled:
            protos.append(runtime_pb2.Tensor(buffer=msg["scale"], size=[len(msg["scale"])], dtype="uint8"))
        index.append([name, codec, scaled])
    return protos, index


def tensors_from_proto(protos, index, expected: tuple) -> dict:
    """Protobuf Tensors + the metadata index -> {name: codec dict}, checking names and counts against
    the method's table before anything is decoded."""
    if not isinstance(index, list) or len(index) > len(expected):
        raise PayloadError("malformed", "metadata 'tensors' must list this call's tensors")
    allowed = dict(expected)
    out, pos = {}, 0
    for entry in index:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[1], str) and isinstance(entry[2], bool)):
            raise PayloadError("malformed", "each 'tensors' entry must be [name, codec, scaled]")
        name, codec, scaled = entry
        if name not in allowed or name in out:
            raise PayloadError("malformed", f"unexpected tensor {name!r}; this call takes {', '.join(allowed)}")
        parts = 2 if scaled else 1
        if pos + parts > len(protos):
            raise PayloadError("malformed", f"tensor {name!r} is announced but not sent")
        t = protos[pos]
        msg = {"codec": codec, "shape": [int(s) for s in t.size], "data": bytes(t.buffer)}
        if scaled:
            msg["scale"] = bytes(protos[pos + 1].buffer)
        out[name] = msg
        pos += parts
    if pos != len(protos):
        raise PayloadError("malformed", f"{len(protos)} tensors sent, {pos} announced")
    missing = [n for n, optional in expected if not optional and n not in out]
    if missing:
        takes = ", ".join(n + (" (optional)" if optional else "") for n, optional in expected)
        raise PayloadError("malformed", f"missing tensor(s) {', '.join(missing)}; this call takes {takes}")
    return out


def join_stream_parts(parts: list) -> list:
    """Tensors split by hivemind's split_for_streaming (the first part says how many parts follow)."""
    from hivemind.utils.streaming import combine_from_streaming
    tensors, i = [], 0
    while i < len(parts):
        n = max(parts[i].chunks, 1)
        tensors.append(combine_from_streaming(parts[i:i + n]))
        i += n
    return tensors


def stock_tensors(protos, names: tuple) -> dict:
    """Tensors of a stock hivemind client (no metadata): plain float tensors in schema order."""
    if len(protos) != len(names):
        raise PayloadError("malformed", f"expected {len(names)} tensor(s) ({', '.join(names)}), got {len(protos)}")
    out = {}
    for name, t in zip(names, protos):
        codec = STOCK_CODECS.get(t.dtype)
        if codec is None:
            raise PayloadError("codec", f"tensor {name!r} has dtype {t.dtype!r}; send float32, bfloat16 or float16")
        if t.compression != 0:
            raise PayloadError("codec", f"tensor {name!r} uses hivemind compression {t.compression}; send it "
                                        f"uncompressed (CompressionType.NONE)")
        shape = [int(s) for s in t.size]
        if codec == "bf16" and len(t.buffer) == 4 * math.prod(shape):
            codec = "fp32"  # hivemind's legacy bf16 path sends bf16 tensors as fp32 values
        out[name] = {"codec": codec, "shape": shape, "data": bytes(t.buffer)}
    return out


def refusal(reason: str, message: str) -> dict:
    return {"ok": False, "reason": reason, "error": message}
