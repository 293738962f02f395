import msgpack
import pytest
import torch

from protocol.codec import (CODECS, bytes_per_token, decode, decode_ints, encode, encode_ints, message_nbytes,
                            payload_nbytes, roundtrip)
from protocol.errors import PayloadError

# Worst-case relative error per value, as a fraction of the token's absmax (int8, int4), of the channel's
# absmax over all tokens (int8ch, int4ch) or of |x|. The 1 + 2^-7 is the bf16 scale's round-up.
BOUNDS = {"fp32": 0.0, "bf16": 2 ** -8, "fp16": 2 ** -11, "fp8": 2 ** -4, "int8": 0.5 / 127 * (1 + 2 ** -7),
          "int8ch": 0.5 / 127 * (1 + 2 ** -7), "int4": 0.5 / 7 * (1 + 2 ** -7), "int4ch": 0.5 / 7 * (1 + 2 ** -7)}


def _relative_error(x, y, codec):
    if codec in ("int8", "int4"):
        return (y - x).abs() / x.abs().amax(-1, keepdim=True)
    if codec in ("int8ch", "int4ch"):
        return (y - x).abs() / x.abs().reshape(-1, x.shape[-1]).amax(0)
    return (y - x).abs() / x.abs()


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape", [(3, 7, 8), (2, 5, 3), (1, 1)])
def test_roundtrip_error_bounds_and_wire_identity(codec, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape) * torch.logspace(-3, 3, shape[-1])
    if codec == "fp8":  # its normal range, where the relative error bound holds
        x = x.sign() * x.abs().clamp(2 ** -6, 400)
    msg = msgpack.unpackb(msgpack.packb(encode(x, codec)))
    y = decode(msg, expect_codec=codec)
    assert y.shape == x.shape
    assert torch.equal(y, roundtrip(x, codec))  # the reference trainer sees exactly the wire's numbers
    assert _relative_error(x, y, codec).max() <= BOUNDS[codec] + 1e-7
    # Byte counts are exact: what was sent is what message_nbytes and bytes_per_token say.
    tokens = x.numel() // shape[-1]
    assert payload_nbytes(msg) == message_nbytes(codec, shape)
    assert bytes_per_token(codec, shape[-1], tokens) == pytest.approx(payload_nbytes(msg) / tokens, rel=1e-15)


def test_bytes_per_token_of_narrow_codes():
    # b=8 in a microbatch of 512 tokens: 4 data bytes + 8 bf16 scales shared by 512 tokens.
    assert bytes_per_token("int4ch", 8, 512) == 4 + 16 / 512
    assert bytes_per_token("int8ch", 4, 512) == 4 + 8 / 512
    assert bytes_per_token("int8", 4) == bytes_per_token("int8", 4, 512) == 6  # per-token scale
    assert bytes_per_token("int4", 8) == 4 + 2 and message_nbytes("int4", [2, 3]) == 3 + 4  # 6 nibbles, 2 scales
    assert bytes_per_token("int4ch", 2, 64) == 68 / 64  # 1 data byte per token + 2 scales (4 bytes) per message
    assert message_nbytes("int4ch", [3, 3]) == 5 + 6  # 9 nibbles -> 5 bytes, 3 scales
    with pytest.raises(ValueError, match="pass tokens"):
        bytes_per_token("int4ch", 8)


def test_fp8_refuses_out_of_range_and_config_refuses_fp8_gradients():
    from swarm.config import ConfigError, ModelConfig

    with pytest.raises(ValueError, match="fp8 range"):
        encode(torch.tensor([[500.0]]), "fp8")
    assert bytes_per_token("fp8", 4) == 4
    assert ModelConfig(codec="fp8", codec_bwd="bf16").wire_codec_bwd == "bf16"
    with pytest.raises(ConfigError, match="gradients"):
        ModelConfig(codec="fp8")


def test_int4_packing_layout():
    # low nibble first, value + 8; an odd tail pads with the nibble of zero
    x = torch.tensor([[7.0, -7.0, 0.0]])
    msg = encode(x, "int4ch")
    assert msg["data"] == bytes([(15 | 1 << 4), 8 | 8 << 4])
    assert torch.equal(decode(msg), x)


@pytest.mark.parametrize("codec", ["int8ch", "int4ch"])
def test_per_channel_codecs_share_scales_across_tokens(codec):
    # a channel that is tiny everywhere keeps its resolution even when another channel is huge
    x = torch.stack([torch.linspace(-1e-6, 1e-6, 64), torch.linspace(-1e3, 1e3, 64)], dim=-1)
    y = decode(encode(x, codec))
    assert (y[:, 0] - x[:, 0]).abs().max() <= 1e-6 * 0.5 / (127 if codec == "int8ch" else 7) * 1.01
    assert len(encode(x, codec)["scale"]) == 2 * 2


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
    (lambda m: m.update(codec="fp6"), "codec"),
    (lambda m: m.update(data=b"\xff\x7f" * 24), "nonfinite"),  # bf16 NaN pattern
    (lambda m: m.update(shape=[1 << 20, 1 << 10, 64]), "size"),
    # element counts that overflow int64 (np.prod wraps [2^32, 2^32, 2] to 0): exact ints refuse them
    (lambda m: m.update(shape=[2 ** 32, 2 ** 32, 2], data=b""), "size"),
    (lambda m: m.update(shape=[2 ** 32, 2 ** 32, 2 ** 32, 4], data=b""), "size"),
    (lambda m: m.update(shape=[2 ** 63, 2, 4], data=b""), "size"),
    (lambda m: m.update(shape=[2 ** 64 - 1, 2 ** 64 - 1, 4], data=b""), "size"),
    (lambda m: m.update(shape=[2, True, 4]), "shape"),
])
def test_corrupt_payloads_are_rejected_with_reason(mutate, reason):
    msg = _good()
    mutate(msg)
    with pytest.raises(PayloadError) as err:
        decode(msg, max_elems=1 << 20)
    assert err.value.reason == reason


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape", [[2 ** 32, 2 ** 32, 2], [2 ** 31, 2 ** 33, 2], [2 ** 62, 4, 2], [1, 2 ** 64 + 2]])
def test_overflowing_shapes_are_size_errors_for_every_codec(codec, shape):
    # With int64 products these wrap to 0 (or a small number) and passed the size check, with no data.
    msg = {"codec": codec, "shape": shape, "data": b"", "scale": b""}
    with pytest.raises(PayloadError) as err:
        decode(msg, width=shape[-1])
    assert err.value.reason == "size"
    with pytest.raises(PayloadError) as err:
        decode_ints({"codec": "u8", "shape": shape, "data": b""}, 256)
    assert err.value.reason == "size"


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


def test_token_ids_of_a_50k_vocabulary_travel_as_u16():
    vocab = 50257  # GPT-2's BPE
    t = torch.tensor([[0, 255, 256, 40000, vocab - 1]])
    msg = encode_ints(t, vocab)
    assert msg["codec"] == "u16" and len(msg["data"]) == 2 * t.numel()
    assert torch.equal(decode_ints(msg, vocab), t)
    assert encode_ints(t, 1 << 16)["codec"] == "u16" and encode_ints(t, (1 << 16) + 1)["codec"] == "i32"
    with pytest.raises(PayloadError) as err:
        decode_ints(encode_ints(torch.tensor([[vocab]]), 1 << 16), vocab)
    assert err.value.reason == "token_range"


@pytest.mark.parametrize("codec, codec_bwd", [("int4ch", "int8ch"), ("int8ch", "bf16"), ("bf16", "int4ch"),
                                              ("int8", "int8"), ("fp8", "bf16")])
def test_training_wire_is_the_wire_bit_for_bit(codec, codec_bwd):
    # What the reference trainer computes at a boundary equals decode(encode(.)) in both directions.
    from swarm.boundary import wire

    torch.manual_seed(1)
    x = (torch.randn(2, 16, 8) * torch.logspace(-2, 1, 8)).requires_grad_()
    g = torch.randn(2, 16, 8) * 1e-6
    y = wire(x, codec, codec_bwd)
    assert torch.equal(y, decode(encode(x.detach(), codec)))
    y.backward(g)
    assert torch.equal(x.grad, decode(encode(g, codec_bwd)))


def test_staged_model_applies_forward_and_gradient_codecs(monkeypatch):
    import swarm.model
    from swarm.config import ModelConfig

    seen = []
    real_wire = swarm.model.wire
    monkeypatch.setattr(swarm.model, "wire", lambda x, c, cb=None: seen.append((c, cb, x.shape)) or real_wire(x, c, cb))
    cfg = ModelConfig(d_model=64, n_layers=3, n_heads=2, seq_len=8, n_stages=3, ratio=8, codec="int4ch", codec_bwd="int8ch")
    swarm.model.StagedModel(cfg)(torch.randint(0, 256, (2, 8))).sum().backward()
    assert seen == [("int4ch", "int8ch", (2, 8, 8))] * 2
    assert ModelConfig(codec="int4ch").wire_codec_bwd == "int4ch"
