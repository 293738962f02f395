"""Owner-signed DHT records with Ed25519 (protocol/signing.py), checked on records as the DHT handles
them (serialized key, subkey and value), without a network."""
import base64
import dataclasses
import importlib.util
import pickle
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from node.announce import owned_by_its_peer, owner_subkey
from protocol.records import stage_key, stage_record
from protocol.signing import Ed25519RecordValidator

ROOT = Path(__file__).resolve().parent.parent
OTHER_KEY = Ed25519PrivateKey.generate()
ME, OTHER = Ed25519RecordValidator(Ed25519PrivateKey.generate()), Ed25519RecordValidator(OTHER_KEY)


def record(subkey, value=None, key=stage_key("sign", 1), raw_key: bytes | None = None) -> DHTRecord:
    """An unsigned record as hivemind's DHT hands it to validators (the key hashed to its DHT id)."""
    value = value if value is not None else stage_record(
        stage=1, peer_id="QmMe", throughput=1.0, queue=0, fingerprint="fp", step=3, serving=True,
        started=get_dht_time(), updated=get_dht_time())
    return DHTRecord(key=raw_key or DHTID.generate(source=key).to_bytes(), subkey=MSGPackSerializer.dumps(subkey),
                     value=MSGPackSerializer.dumps(value), expiration_time=get_dht_time() + 60)


def signed(rec: DHTRecord, validator=ME) -> DHTRecord:
    return dataclasses.replace(rec, value=validator.sign_value(rec))


def test_own_record_validates_and_strips_back_to_the_value():
    rec = record(owner_subkey("QmMe", ME))
    out = signed(rec)
    assert out.value != rec.value and ME.validate(out) and OTHER.validate(out)  # anyone can check it
    assert ME.strip_value(out) == rec.value
    assert owned_by_its_peer(owner_subkey("QmMe", ME), "QmMe")
    assert not owned_by_its_peer(b"QmMe[owner:ssh-rsa AAAA]", "QmMe")  # an RSA record of older releases


def test_changed_value_or_foreign_signature_fails():
    rec = record(owner_subkey("QmMe", ME))
    out = signed(rec)
    tampered = dataclasses.replace(out, value=out.value.replace(b"QmMe", b"QmXx"))
    assert tampered.value != out.value and not ME.validate(tampered)
    assert not ME.validate(dataclasses.replace(out, expiration_time=out.expiration_time + 1))
    # someone else cannot write under our subkey: OTHER does not sign (not its key) ...
    assert OTHER.sign_value(rec) == rec.value and not ME.validate(rec)
    # ... and a signature of this very record made with its key does not verify against ours
    signature = OTHER_KEY.sign(MSGPackSerializer.dumps(dataclasses.astuple(rec)))
    forged = dataclasses.replace(rec, value=rec.value + b"[ed25519-sig:" + base64.urlsafe_b64encode(signature) + b"]")
    assert not ME.validate(forged) and not OTHER.validate(forged)
    assert OTHER.validate(signed(record(owner_subkey("QmMe", OTHER)), OTHER))  # under its own subkey: fine


def test_different_keys_in_key_and_subkey_fail():
    # (hivemind's DHT hashes keys to their ids: a key marker shows only where a caller builds records)
    rec = record(owner_subkey("QmMe", ME), raw_key=b"sign.1" + ME.local_public_key)
    assert ME.validate(signed(rec))  # the same key in both: fine
    rec = record(owner_subkey("QmMe", ME), raw_key=b"sign.1" + OTHER.local_public_key)
    assert not ME.validate(signed(rec)) and not ME.validate(signed(rec, OTHER))


def test_exactly_one_signature():
    rec = record(owner_subkey("QmMe", ME))
    assert not ME.validate(rec)  # none
    out = signed(rec)
    twice = dataclasses.replace(out, value=out.value + out.value[len(rec.value):])
    assert not ME.validate(twice)


@pytest.mark.parametrize("marker", [
    b"[ed25519:]", b"[ed25519:!!not base64!!]", b"[ed25519:" + base64.urlsafe_b64encode(bytes(31)) + b"]",
    b"[ed25519:" + base64.urlsafe_b64encode(bytes(33)) + b"]",
    b"[ed25519:" + base64.urlsafe_b64encode(bytes(32)).rstrip(b"=") + b"]",   # not canonical
    b"[ed25519:" + base64.b64encode(b"\xfb" * 32) + b"]",                     # standard, not urlsafe
    b"[ed25519:" + base64.urlsafe_b64encode(b"\xff" * 32) + b"]",            # 32 bytes, not a key
    b"[ed25519:\x00\xff\n]",
])
def test_garbage_key_markers_fail_without_raising(marker):
    rec = record(b"QmMe" + marker)
    assert ME.validate(rec) is False
    fake_signature = b"[ed25519-sig:" + base64.urlsafe_b64encode(bytes(64)) + b"]"
    assert ME.validate(dataclasses.replace(rec, value=rec.value + fake_signature)) is False


@pytest.mark.parametrize("signature", [b"", b"!!", base64.urlsafe_b64encode(bytes(63)), b"\x00\n\xff",
                                       base64.urlsafe_b64encode(bytes(64))])
def test_garbage_signatures_fail_without_raising(signature):
    rec = record(owner_subkey("QmMe", ME))
    assert ME.validate(dataclasses.replace(rec, value=rec.value + b"[ed25519-sig:" + signature + b"]")) is False


def test_unprotected_record_passes_unchanged():
    rec = record(b"QmUnsigned")
    assert ME.validate(rec) and ME.sign_value(rec) == rec.value and ME.strip_value(rec) == rec.value


def test_hivemind_rsa_validator_takes_our_records_for_unprotected():
    rsa = RSASignatureValidator()
    out = signed(record(owner_subkey("QmMe", ME)))
    assert rsa.validate(out) and rsa.sign_value(out) == out.value and rsa.strip_value(out) == out.value
    assert not ME.merge_with(rsa) and ME.merge_with(OTHER)


def test_stock_client_validator_reads_our_records():
    spec = importlib.util.spec_from_file_location("stock_client", ROOT / "examples" / "stock_client.py")
    stock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stock)
    reader = stock.Ed25519Records()
    rec = record(owner_subkey("QmMe", ME))
    out = signed(rec)
    assert reader.validate(out) and reader.strip_value(out) == rec.value
    assert not reader.validate(rec) and not reader.validate(signed(rec, OTHER))
    assert not reader.validate(dataclasses.replace(out, value=out.value.replace(b"QmMe", b"QmXx")))


def test_default_key_is_process_wide_and_pickles():
    assert Ed25519RecordValidator().local_public_key == Ed25519RecordValidator().local_public_key
    copy = pickle.loads(pickle.dumps(ME))
    assert copy.local_public_key == ME.local_public_key
    assert ME.validate(signed(record(owner_subkey("QmMe", ME)), copy))


def test_marker_and_signature_are_a_third_of_rsa():
    def overhead(validator) -> int:
        rec = record(b"QmMe" + validator.local_public_key)
        return len(validator.local_public_key) + len(validator.sign_value(rec)) - len(rec.value)
    ours, rsa = overhead(ME), overhead(RSASignatureValidator())
    assert ours < 200 and 3 * ours < rsa, (ours, rsa)
