"""The tokenizers a run can name with --tokenizer.

    bytes          256 ids, the UTF-8 bytes themselves; nothing to load (the default)
    <file>.json    a `tokenizers` JSON file, e.g. a BPE trained with the `tokenizers` library
    hf:<name>      the tokenizer.json of a Hugging Face hub model (downloaded once by `tokenizers`)

`content_hash` identifies a tokenizer by its content (its canonical JSON), not by where it lives:
two trainers with the same file at different paths agree, a retrained one is refused.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from swarm.config import ConfigError

# Appended after every document when the vocabulary has one of them, so that the model sees where
# one text ends (byte-level runs keep concatenating texts as they always did).
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")


def _as_text(doc) -> str:
    return doc.decode("utf-8", errors="replace") if isinstance(doc, (bytes, bytearray, memoryview)) else doc


class ByteTokenizer:
    name = "bytes"
    vocab_size = 256
    content_hash = "bytes"
    eos = None

    def encode_documents(self, docs) -> list[np.ndarray]:
        return [np.frombuffer(d if isinstance(d, bytes) else d.encode(), dtype=np.uint8) for d in docs]

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")


class TokenizersTokenizer:
    """A `tokenizers.Tokenizer`; its batch encoder runs in Rust (on every core unless
    TOKENIZERS_PARALLELISM=false)."""

    def __init__(self, tok, name: str):
        self.tok, self.name = tok, name
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.content_hash = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
        self.eos = next((tok.token_to_id(n) for n in EOS_NAMES if tok.token_to_id(n) is not None), None)
        self._encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast: no offsets (tokenizers>=0.21)

    def encode_documents(self, docs) -> list[np.ndarray]:
        tail = [] if self.eos is None else [self.eos]
        return [np.asarray(e.ids + tail, dtype=np.int64)
                for e in self._encode([_as_text(d) for d in docs], add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str):
    """The tokenizer `spec` names; a clear ConfigError when it cannot be had."""
    if spec == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer
    if spec.startswith("hf:"):
        try:
            return TokenizersTokenizer(Tokenizer.from_pretrained(spec[3:]), spec)
        except Exception as e:  # the hub's errors are many kinds (no network, no such repo, no tokenizer.json)
            raise ConfigError(f"tokenizer {spec}: cannot load {spec[3:]!r} from the Hugging Face hub: {e}") from e
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"tokenizer {spec!r} is not 'bytes', 'hf:<name>' or an existing tokenizers JSON file")
    try:
        return TokenizersTokenizer(Tokenizer.from_file(str(path)), spec)
    except Exception as e:  # tokenizers raises its own Exception for a file it cannot parse
        raise ConfigError(f"tokenizer {spec}: not a tokenizers JSON file ({e})") from e
