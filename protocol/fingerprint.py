"""Config fingerprints: every peer of a run must agree on everything that shapes the math."""
from __future__ import annotations

import hashlib
import json


def canonical(config: dict) -> bytes:
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def fingerprint(config: dict) -> str:
    return hashlib.sha256(canonical(config)).hexdigest()[:16]


def describe_diff(ours: dict, theirs: dict) -> list[str]:
    """Human-readable list of fields that differ, e.g. ["ratio: ours 128, theirs 64"]."""
    out = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key, "<missing>"), theirs.get(key, "<missing>")
        if a != b:
            out.append(f"{key}: ours {a!r}, theirs {b!r}")
    return out
