"""Which sequences a trainer draws, so that trainers never draw the same ones, with no roster.

Every trainer reads its own stream of the data. Its n-th microbatch is slot n % M of step n // M
(M = microbatches per step) in stream s, drawn as `corpus.batch(split, ..., step, slot + M * s)`
(swarm/data.py: a pure function of seed, split, step and slot). Streams never share a (step, slot)
pair, stream 0 is exactly train-local's data (the parity tests rely on it), and a trainer's default
stream is a stable hash of its peer id, so a restarted trainer (same identity) draws the same data.
"""
from __future__ import annotations

import hashlib

STREAMS = 1 << 24  # default streams are drawn from 1 .. STREAMS (0 is train-local's)


def data_stream(peer_id: str) -> int:
    """A trainer's default data stream: a stable hash of its peer id, never 0."""
    return 1 + int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "little") % STREAMS


def batch_key(index: int, microbatches: int, stream: int) -> tuple[int, int]:
    """(step, slot) under which the `index`-th microbatch of `stream` is drawn from the corpus."""
    if microbatches < 1 or index < 0 or stream < 0:
        raise ValueError(f"need microbatches >= 1, index >= 0 and stream >= 0 (got {microbatches}, {index}, {stream})")
    return index // microbatches, index % microbatches + microbatches * stream
