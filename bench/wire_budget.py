"""What each node's link must carry per token on the neighbour-to-neighbour route, and what that
bounds: the arithmetic behind bench.scaling's choice of link rate and model, and the figure its
measurements are checked against.

Per token a node handles (the bytes of codes, gradients and target ids; message framing and
metadata come on top and are measured, not modelled here):

    trainer   sends   code + targets            receives  gradient
    middle    sends   code + targets + gradient  receives  code + targets + gradient
    tail      sends   gradient                  receives  code + targets

Replica averaging (butterfly all-reduce of the stage's parameters among n replicas) moves about
2 (n-1)/n x P x value bytes each way per replica per round, and a replica handles 1/n of the
swarm's tokens, so its share per handled token is that over (every x tokens_per_step / n).
"""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("trainer", "middle", "tail")


@dataclass(frozen=True)
class Link:
    sent: float       # bytes per handled token
    received: float

    def __add__(self, other: "Link") -> "Link":
        return Link(self.sent + other.sent, self.received + other.received)

    @property
    def busiest_direction(self) -> float:
        return max(self.sent, self.received)

    @property
    def total(self) -> float:
        return self.sent + self.received


def code_bytes(role: str, code: float, grad: float, targets: float) -> Link:
    """Code, gradient and target-id bytes per handled token on one node's link, by its role."""
    if role == "trainer":
        return Link(code + targets, grad)
    if role == "middle":
        return Link(code + targets + grad, code + targets + grad)
    if role == "tail":
        return Link(grad, code + targets)
    raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")


def averaging_bytes(params: int, replicas: int, every: int, tokens_per_step: int, value_bytes: int = 4) -> Link:
    """Replica averaging's bytes per handled token on one replica's link (0 with one replica)."""
    if replicas < 1 or tokens_per_step < 1:
        raise ValueError("replicas and tokens_per_step must be >= 1")
    if replicas == 1 or not every:
        return Link(0.0, 0.0)
    per_round = 2 * (replicas - 1) / replicas * params * value_bytes
    handled = every * tokens_per_step / replicas
    return Link(per_round / handled, per_round / handled)


def link_bound_tokens_per_s(link_bytes_per_s: float, per_node: dict, replicas: int) -> float:
    """Swarm tokens/s the links allow: each node handles 1/replicas of the tokens, and its busier
    direction (links are shaped per direction) fills first. `per_node`: role -> Link per token."""
    worst = max(link.busiest_direction for link in per_node.values())
    return replicas * link_bytes_per_s / worst if worst > 0 else float("inf")


def hub_codes_per_token(n_stages: int) -> int:
    """Codes per token per direction on the old head's link (for the README's before/after):
    every boundary's code passes through the head, out and back, except the first and last."""
    if n_stages < 2:
        raise ValueError("a pipeline needs at least 2 stages")
    return 3 * n_stages - 4
