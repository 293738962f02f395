import msgpack
import pytest
import torch

from protocol.codec import bytes_per_token, decode, decode_ints, encode, encode_ints, payload_nbytes, roundtrip
from protocol.errors import PayloadError

# Worst-case relative error per value, as a fraction of the token's absmax (int8) or of |x|.
BOUNDS = {"fp32": 0.0, "bf16": 2 ** -8, "fp16": 2 ** -11, "int8": 0.5 / 127 * (1 + 2 ** -7)}


@pytest.mark.parametrize("codec", ["fp32", "bf16", "fp16", "int8"])
def test_roundtrip_error_bounds_and_wire_identity(codec):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 8) * torch.logspace(-3, 3, 8)
    msg = msgpack.unpackb(msgpack.packb(encode(x, codec)))
    y = decode(msg, expect_codec=codec)
    assert y.shape == x.shape
    assert torch.equal(y, roundtrip(x, codec))  # the reference trainer sees exactly the wire's numbers
    if codec == "int8":
        err = (y - x).abs() / x.abs().amax(-1, keepdim=True)
    else:
        err = (y - x).abs() / x.abs()
    assert err.max() <= BOUNDS[codec] + 1e-7
    assert payload_nbytes(msg) == 21 * bytes_per_token(codec, 8)


def test_int8_keeps_tiny_gradients():
    # code gradients are often ~1e-7: an fp16 scale would underflow and zero them
    g = torch.randn(4, 8) * 1e-7
    y = decode(encode(g, "int8"))
    assert (y - g).abs().max() <= g.abs().amax(-1, keepdim=True).max() * 0.5 / 127 * 1.01
    assert torch.count_nonzero(y) >= 28


def test_int8_zero_rows_and_sizes():
    x = torch.zeros(2, 4)
    assert torch.equal(decode(encode(x, "int8")), x)
    assert bytes_per_token("int8", 32) == 34 and bytes_per_token("bf16", 32) == 64


def _good():
    return encode(torch.randn(2, 3, 4), "bf16")


@pytest.mark.parametrize("mutate, reason", [
    (lambda m: m.pop("data"), "malformed"),
    (lambda m: m.update(data=m["data"][:-1]), "size"),
    (lambda m: m.update(shape=[2, 3, 5]), "size"),
    (lambda m: m.update(shape=[2, -3, 4]), "shape"),
    (lambda m: m.update(shape="2x3"), "malformed"),
    (lambda m: m.update(codec="fp8"), "codec"),
    (lambda m: m.update(data=b"\xff\x7f" * 24), "nonfinite"),  # bf16 NaN pattern
    (lambda m: m.update(shape=[1 << 20, 1 << 10, 64]), "size"),
])
def test_corrupt_payloads_are_rejected_with_reason(mutate, reason):
    msg = _good()
    mutate(msg)
    with pytest.raises(PayloadError) as err:
        decode(msg, max_elems=1 << 20)
    assert err.value.reason == reason


def test_wrong_codec_and_nonfinite_encode():
    with pytest.raises(PayloadError, match="uses codec 'int8'"):
        decode(_good(), expect_codec="int8")
    with pytest.raises(ValueError, match="NaN or inf"):
        encode(torch.tensor([[1.0, float("nan")]]), "bf16")


def test_int8_scale_corruption_rejected():
    msg = encode(torch.randn(2, 4), "int8")
    msg["scale"] = b"\x80\x7f" * 2  # bf16 +inf
    with pytest.raises(PayloadError) as err:
        decode(msg)
    assert err.value.reason == "nonfinite"


def test_token_ids():
    t = torch.randint(0, 256, (2, 9))
    msg = encode_ints(t, 256)
    assert msg["codec"] == "u8" and len(msg["data"]) == 18
    assert torch.equal(decode_ints(msg, 256), t)
    with pytest.raises(PayloadError) as err:
        decode_ints(encode_ints(torch.tensor([[0, 300]]), 1000), 256)
    assert err.value.reason == "token_range"
