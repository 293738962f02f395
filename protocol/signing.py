"""Owner-signed DHT records with Ed25519 (a hivemind record validator).

A record whose key or subkey holds `[ed25519:<key>]` (urlsafe base64 of the owner's 32-byte raw
Ed25519 public key) is protected: its value must hold exactly one `[ed25519-sig:<signature>]`
(urlsafe base64 of the 64-byte signature, appended by sign_value) made with that key over
MSGPackSerializer.dumps(dataclasses.astuple(record without the signature)), as hivemind's
RSASignatureValidator signs. Only the key's owner can then write a value under such a subkey. A
record without the marker is not protected. The markers differ from the RSA validator's
(`[owner:...]`, `[signature:...]`), so that one treats our records as unprotected; it cannot
strip our signature, though: a hivemind DHT reads our records only with this validator (or one
like examples/stock_client.py's) among its record validators.

A record carries 54 + 102 bytes of key marker and signature instead of RSA's 388 + 356.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import threading

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer

KEY_BYTES, SIGNATURE_BYTES = 32, 64
KEY_MARKER = b"[ed25519:"            # + urlsafe base64 of the public key + "]", in a key or subkey
SIGNATURE_MARKER = b"[ed25519-sig:"  # + urlsafe base64 of the signature + "]", at the end of the value
PUBLIC_KEY_FORMAT = KEY_MARKER + b"_key_]"
SIGNATURE_FORMAT = SIGNATURE_MARKER + b"_value_]"
# Lenient on purpose (anything up to the next "]"): a marker that does not decode to a key is then a
# broken protected record (refused), never an unprotected one.
_PUBLIC_KEY_RE = re.compile(re.escape(PUBLIC_KEY_FORMAT).replace(b"_key_", rb"(.*?)"), re.DOTALL)
_SIGNATURE_RE = re.compile(re.escape(SIGNATURE_FORMAT).replace(b"_value_", rb"(.*?)"), re.DOTALL)

_process_wide_key: Ed25519PrivateKey | None = None
_process_wide_lock = threading.Lock()


def process_wide_key() -> Ed25519PrivateKey:
    """This process's signing key, made on first use (a forked child, such as hivemind's DHT process,
    inherits it: the DHT then signs with the key our subkeys name)."""
    global _process_wide_key
    with _process_wide_lock:
        if _process_wide_key is None:
            _process_wide_key = Ed25519PrivateKey.generate()
        return _process_wide_key


def _b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw)


def _unb64(text: bytes, size: int) -> bytes | None:
    """The `size` raw bytes that `text` is the canonical urlsafe base64 of, else None."""
    try:
        raw = base64.b64decode(text, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size and _b64(raw) == text else None


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Ed25519RecordValidator(RecordValidatorBase):
    """hivemind's RSASignatureValidator with Ed25519 keys and signatures (see the module docstring).
    `private_key`: sign with it (default: this process's key, shared by every instance)."""

    def __init__(self, private_key: Ed25519PrivateKey | None = None):
        self._private_key = private_key if private_key is not None else process_wide_key()
        self._local_public_key = PUBLIC_KEY_FORMAT.replace(b"_key_", _b64(_raw_public(self._private_key)))

    @property
    def local_public_key(self) -> bytes:
        """The marker naming our key: put it in a key or subkey to protect the record."""
        return self._local_public_key

    def validate(self, record: DHTRecord) -> bool:
        keys = _PUBLIC_KEY_RE.findall(record.key)
        if record.subkey is not None:
            keys += _PUBLIC_KEY_RE.findall(record.subkey)
        if not keys:
            return True  # not protected
        if len(set(keys)) > 1:
            return False  # key and subkey name different owners
        signatures = _SIGNATURE_RE.findall(record.value)
        if len(signatures) != 1:
            return False
        raw_key, signature = _unb64(keys[0], KEY_BYTES), _unb64(signatures[0], SIGNATURE_BYTES)
        if raw_key is None or signature is None:
            return False
        stripped = dataclasses.replace(record, value=self.strip_value(record))
        try:
            Ed25519PublicKey.from_public_bytes(raw_key).verify(signature, self._serialize_record(stripped))
        except Exception:  # InvalidSignature, or whatever a hostile key makes the library raise: refused
            return False
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._local_public_key not in record.key and \
                (record.subkey is None or self._local_public_key not in record.subkey):
            return record.value
        signature = self._private_key.sign(self._serialize_record(record))
        return record.value + SIGNATURE_FORMAT.replace(b"_value_", _b64(signature))

    def strip_value(self, record: DHTRecord) -> bytes:
        return _SIGNATURE_RE.sub(b"", record.value)

    @staticmethod
    def _serialize_record(record: DHTRecord) -> bytes:
        return MSGPackSerializer.dumps(dataclasses.astuple(record))

    @property
    def priority(self) -> int:
        return 10  # validate (and strip) before the validators that deserialize the value (the schema)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        # several instances make no sense (as with hivemind's RSA validator): keep ours, drop the other
        return isinstance(other, Ed25519RecordValidator)

    def __getstate__(self):  # picklable (hivemind may send validators to its DHT process)
        raw = self._private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption())
        return {"private_key": raw}

    def __setstate__(self, state):
        self.__init__(Ed25519PrivateKey.from_private_bytes(state["private_key"]))
