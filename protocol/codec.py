"""Codecs for boundary codes and their gradients.

A tensor [..., width] travels as data bytes plus, for the integer codecs, scale bytes. The same
functions serve the reference trainer (`roundtrip`, pure torch, any device) and the wire
(`encode`/`decode`, bytes), so the swarm and `train-local` compute exactly the same numbers.

    fp32    4 bytes/value
    bf16    2 bytes/value (truncating cast with round-to-nearest-even, as torch does)
    fp16    2 bytes/value (values beyond the fp16 range are refused, not clipped silently)
    fp8     1 byte/value, float8 e4m3 (|x| <= 448 or refused; no scale; values below ~2e-3 lose
            precision and below ~1e-3 become 0, so it suits codes, not their gradients)
    int8    1 byte/value + one bf16 scale per token (symmetric absmax / 127)
    int8ch  1 byte/value + one bf16 scale per channel, shared by every token of the message
    int4    1/2 byte/value (packed as int4ch) + one bf16 scale per token (symmetric absmax / 7)
    int4ch  1/2 byte/value (two values per byte, low nibble first) + one bf16 scale per channel

Why per-channel scales: at a narrow code (b = 2..16 values per token) a per-token scale costs as
much as the values themselves, while one scale per channel for a whole microbatch (hundreds of
tokens) costs almost nothing per token. The scale layout follows from codec + shape alone:
[width] scales for the *ch codecs, shape[:-1] for int8.

Scales are bf16, not fp16: gradients of codes are often ~1e-6 and smaller, and their absmax/127
underflows fp16 (smallest normal 6e-5), which silently zeroes or distorts them. A scale is rounded
UP to bf16, so no value needs clipping and the error stays <= scale / 2.

All size arithmetic is exact Python integer arithmetic on validated ints, done before anything is
allocated: a hostile shape can only ever produce a `shape` or `size` PayloadError.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from protocol import CODECS  # noqa: F401  (re-exported: the codec names are part of this module's API)
from protocol.errors import PayloadError

# Bits per value on the wire, and the largest quantized magnitude of the integer codecs.
_VALUE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int8ch": 8, "int4": 4, "int4ch": 4}
_QMAX = {"int8": 127, "int8ch": 127, "int4": 7, "int4ch": 7}
PER_TOKEN_SCALED = ("int8", "int4")
PACKED = ("int4", "int4ch")  # two values per byte
SHARED_SCALED = ("int8ch", "int4ch")  # scales shared by all tokens of one message
_SCALE_BYTES = 2  # one bf16 per scale
_FLOAT_MAX = {"fp16": 65504.0, "fp8": 448.0}
_FLOAT_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}

# Integer tensors (token ids, targets) travel as the narrowest unsigned type that fits the vocab.
INT_CODECS = {"u8": (np.uint8, 255), "u16": (np.uint16, 65535), "i32": (np.int32, 2**31 - 1)}


def check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def data_nbytes(codec: str, n_values: int) -> int:
    """Exact data bytes for n values (int4 packs two per byte, the last byte half used if n is odd)."""
    return -(-n_values * _VALUE_BITS[codec] // 8)


def scale_count(codec: str, shape) -> int:
    """How many bf16 scales a tensor of this shape carries; follows from codec + shape alone."""
    if codec in PER_TOKEN_SCALED:
        return math.prod(shape[:-1])
    if codec in SHARED_SCALED:
        return shape[-1]
    return 0


def message_nbytes(codec: str, shape) -> int:
    """Exact payload bytes (data + scales) of one encoded tensor of this shape."""
    check_codec(codec)
    shape = [int(s) for s in shape]
    return data_nbytes(codec, math.prod(shape)) + _SCALE_BYTES * scale_count(codec, shape)


def bytes_per_token(codec: str, width: int, tokens: int | None = None):
    """Payload bytes per token of `width` values, scales included.

    For the per-channel codecs (int8ch, int4ch) the scales are shared by the `tokens` tokens of one
    message (a microbatch), so the figure depends on it: pass `tokens`; it is then
    message_nbytes(codec, [tokens, width]) / tokens, exact (an int when it divides evenly).
    Without `tokens` those codecs raise rather than quote a figure that hides their scales.
    """
    check_codec(codec)
    if tokens is None:
        if codec in SHARED_SCALED:
            raise ValueError(f"codec {codec!r} shares its scales across the tokens of a message: pass tokens=")
        tokens = 1  # per-token codecs: the same figure for any token count
    total = message_nbytes(codec, [tokens, width])
    per, rest = divmod(total, tokens)
    return per if rest == 0 else total / tokens


def int_codec_for(vocab_size: int) -> str:
    for name, (_, top) in INT_CODECS.items():
        if vocab_size - 1 <= top:
            return name
    raise ValueError(f"vocab_size {vocab_size} too large")


def _absmax(x: torch.Tensor, codec: str) -> torch.Tensor:
    """Per-token absmax [..., 1] (int8, int4) or per-channel absmax over every token [width] (*ch codecs)."""
    if codec in PER_TOKEN_SCALED:
        return x.abs().amax(dim=-1, keepdim=True)
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 0:
        return torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
    return flat.abs().amax(dim=0)


def quantize(x: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float tensor -> (payload tensor in its wire dtype, bf16 scales or None). int4 values are
    held unpacked in an int8 tensor here; `encode` packs them two per byte."""
    check_codec(codec)
    x = x.detach()
    if codec in _FLOAT_MAX and x.numel() and x.abs().max().item() > _FLOAT_MAX[codec]:
        raise ValueError(f"tensor exceeds the {codec} range; use bf16 or fp32 for this boundary")
    if codec in _FLOAT_DTYPE:
        return x.to(_FLOAT_DTYPE[codec]), None
    qmax = _QMAX[codec]
    xf = x.float()
    absmax = _absmax(xf, codec)
    scale = round_up_bf16(absmax / qmax)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(absmax))
    q = torch.round(xf / safe).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """Smallest bf16 >= x, for finite x >= 0 (the next bf16 above a positive one is its bits + 1)."""
    y = x.to(torch.bfloat16)
    bumped = (y.view(torch.int16) + 1).view(torch.bfloat16)
    return torch.where(y.float() < x, bumped, y)


def dequantize(payload: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Scales broadcast: [..., 1] per token or [width] per channel."""
    if scale is None:
        return payload.float()
    return payload.float() * scale.float()


def roundtrip(x: torch.Tensor, codec: str) -> torch.Tensor:
    """What the receiver sees after encode -> wire -> decode, computed without bytes."""
    return dequantize(*quantize(x, codec)).to(x.dtype)


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16 or float8: ship their bits
        t = t.view(torch.int16)
    elif t.dtype == torch.float8_e4m3fn:
        t = t.view(torch.uint8)
    return t.numpy().tobytes()


def _pack_int4(q: torch.Tensor) -> bytes:
    """Values in [-7, 7] -> nibbles q + 8, two per byte, low nibble first; an odd tail pads with 8 (zero)."""
    u = (q.reshape(-1).cpu().numpy().astype(np.int16) + 8).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(8))
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()


def _unpack_int4(data: bytes, n: int) -> np.ndarray:
    u = np.frombuffer(data, dtype=np.uint8)
    both = np.empty(u.size * 2, dtype=np.int8)
    both[0::2] = (u & 0x0F).astype(np.int8)
    both[1::2] = (u >> 4).astype(np.int8)
    return both[:n] - np.int8(8)


def encode(x: torch.Tensor, codec: str) -> dict:
    """Float tensor -> msgpack-able dict. Refuses non-finite values instead of shipping them."""
    if not torch.isfinite(x).all():
        raise ValueError("refusing to encode a tensor with NaN or inf values")
    payload, scale = quantize(x, codec)
    data = _pack_int4(payload) if codec in PACKED else _raw_bytes(payload)
    msg = {"codec": codec, "shape": list(x.shape), "data": data}
    if scale is not None:
        msg["scale"] = _raw_bytes(scale)
    return msg


def payload_nbytes(msg: dict) -> int:
    return len(msg["data"]) + len(msg.get("scale", b""))


_NP_DTYPE = {"fp32": np.float32, "bf16": np.int16, "fp16": np.float16, "fp8": np.uint8, "int8": np.int8,
             "int8ch": np.int8}
_VIEW_AS = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def _field(msg, key, kind):
    if not isinstance(msg, dict) or key not in msg:
        raise PayloadError("malformed", f"tensor field is missing {key!r}")
    value = msg[key]
    if not isinstance(value, kind):
        raise PayloadError("malformed", f"tensor field {key!r} has type {type(value).__name__}")
    return value


def _shape(msg, max_elems: int | None) -> list[int]:
    """The validated shape: 1-4 plain non-negative Python ints whose exact product is <= max_elems."""
    shape = _field(msg, "shape", list)
    if not 1 <= len(shape) <= 4 or not all(type(s) is int and s >= 0 for s in shape):
        raise PayloadError("shape", f"shape must be 1-4 non-negative ints, got {shape!r}")
    n = math.prod(shape)  # exact: no int64 overflow can wrap a huge shape to a small count
    if max_elems is not None and n > max_elems:
        raise PayloadError("size", f"{n} values exceed the limit of {max_elems}")
    return shape


def _check_len(raw: bytes, expected: int, what: str, shape, codec: str) -> None:
    if len(raw) != expected:
        raise PayloadError("size", f"{len(raw)} {what} bytes for shape {shape} in {codec}, expected {expected}")


def _decode_payload(data: bytes, codec: str, shape: list[int]) -> torch.Tensor:
    n = math.prod(shape)
    if codec in PACKED:
        return torch.from_numpy(_unpack_int4(data, n).reshape(shape))
    payload = torch.from_numpy(np.frombuffer(data, dtype=_NP_DTYPE[codec]).reshape(shape).copy())
    return payload.view(_VIEW_AS[codec]) if codec in _VIEW_AS else payload


def _decode_scale(msg: dict, codec: str, shape: list[int]) -> torch.Tensor | None:
    count = scale_count(codec, shape)
    if codec not in PER_TOKEN_SCALED + SHARED_SCALED:
        return None
    raw = _field(msg, "scale", bytes)
    _check_len(raw, _SCALE_BYTES * count, "scale", shape, codec)
    scale = torch.from_numpy(np.frombuffer(raw, dtype=np.int16).copy()).view(torch.bfloat16)
    scale = scale.reshape(*shape[:-1], 1) if codec in PER_TOKEN_SCALED else scale
    if scale.numel() and (not torch.isfinite(scale).all() or (scale < 0).any()):
        raise PayloadError("nonfinite", f"{codec} scales must be finite and non-negative")
    return scale


def decode(msg: dict, *, expect_codec: str | None = None, width: int | None = None,
           max_elems: int = 1 << 26) -> torch.Tensor:
    """Wire dict -> float32 tensor. Every malformed input raises PayloadError with the reason.
    `width`, if given, is the required last dimension. All sizes are checked before anything is allocated."""
    codec = _field(msg, "codec", str)
    if codec not in CODECS:
        raise PayloadError("codec", f"unknown codec {codec!r}")
    if expect_codec is not None and codec != expect_codec:
        raise PayloadError("codec", f"this swarm uses codec {expect_codec!r}, got {codec!r}")
    shape = _shape(msg, max_elems if width is None else None)
    if width is not None and shape[-1] != width:
        raise PayloadError("shape", f"last dimension is {shape[-1]}, this boundary carries {width} values per token")
    _shape(msg, max_elems)
    data = _field(msg, "data", bytes)
    _check_len(data, data_nbytes(codec, math.prod(shape)), "data", shape, codec)
    scale = _decode_scale(msg, codec, shape)
    out = dequantize(_decode_payload(data, codec, shape), scale)
    if not torch.isfinite(out).all():
        raise PayloadError("nonfinite", "tensor contains NaN or inf")
    return out


def encode_ints(x: torch.Tensor, vocab_size: int) -> dict:
    name = int_codec_for(vocab_size)
    arr = x.detach().cpu().numpy().astype(INT_CODECS[name][0])
    return {"codec": name, "shape": list(x.shape), "data": arr.tobytes()}


def decode_ints(msg: dict, vocab_size: int, *, max_elems: int = 1 << 24) -> torch.Tensor:
    codec = _field(msg, "codec", str)
    if codec not in INT_CODECS:
        raise PayloadError("codec", f"unknown integer codec {codec!r}")
    shape = _shape(msg, max_elems)
    data = _field(msg, "data", bytes)
    dtype = INT_CODECS[codec][0]
    n = math.prod(shape)
    if len(data) != n * np.dtype(dtype).itemsize:
        raise PayloadError("size", f"{len(data)} bytes for {n} {codec} token ids")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape).astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise PayloadError("token_range", f"token ids must be in [0, {vocab_size}), got "
                                          f"[{arr.min()}, {arr.max()}]")
    return torch.from_numpy(arr)
