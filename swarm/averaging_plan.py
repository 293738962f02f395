"""How replicas of a stage average, as arithmetic: which parameters a round carries (fragments), how
many bytes that puts on a replica's link, and how long a round may take there. Pure rules, no
network: node/averaging.py runs the rounds with them.

The scheme (docs/averaging.md): Streaming-DiLoCo-style fragments, one fragment per round. Replicas
keep an identical anchor (the group's last mean) and a round averages each one's change since it in
2-bit blocks (ANCHORED_BYTES per value; what the 2 bits lose, the replica sends with its next
change); the mean change reaches every replica as the same bytes, so the anchor stays identical. A
group whose anchors of the fragment differ (a joiner from its own checkpoint, a partial round)
averages the parameters themselves, in 8-bit blocks (FULL_BYTES), and their mean becomes the anchor.
Timeouts are sized for the full kind, the larger.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

FULL_BYTES = 1 + 2 / 256          # int8 blocks of 256 with a bf16 scale (protocol/averaging_codec.py)
ANCHORED_BYTES = 0.25 + 2 / 128   # int2 blocks of 128 with a bf16 scale: an anchored round's changes
INT4_BYTES = 0.5 + 2 / 128        # what an anchored round sent until the 2-bit blocks (int4 blocks of 128)
FP16_BYTES = 2                    # what a round sent until the 8-bit blocks
FP32_BYTES = 4                    # what the all-reduce sent before this scheme
FRAGMENT_PARAMS = 16_000_000      # parameters per fragment: 16 MB in 8-bit blocks
PART_S = 1.0                      # a part takes about this long to one reducer at the paced rate
# small parts: a sender's link may drain a few kB/s while the codes keep it full, and libp2p's yamux
# closes a whole connection (every stream on it) when one write to TCP blocks 5-10 s
MIN_PART, MAX_PART = 4 << 10, 4 << 20
WINDOW_PARTS = 2                  # parts a sender has out to one reducer before their results return
SLACK = 3.0                       # a round may take this many times its expected transfer time
FLOOR_S = 5.0                     # plus this (matchmaking's last messages, the reducers' compute, RTTs)
# a part may wait this long beyond its transfer: its sender's link is busy with codes and its CPU
# with compute (measured in the scaling lab: gaps past 11 s between 16 kB parts dropped a sender)
PART_FLOOR_S = 20.0
# ...and at least this share of the whole round: on a link the codes keep full, a thin averaging flow
# loses packets and TCP backs off (retransmission timeouts doubling), so a part can be late by far
# more than its transfer (measured: middle replicas' senders dropped after 22-24 s with 30-46% of
# their segments retransmitted). The round's own timeout still bounds the round.
SILENCE_SHARE = 0.5
MIN_RATE = 1_000.0                # bytes/s: no budget or estimate goes below 8 kbit/s
BACKOFF_FLOOR = 0.25              # ...nor an estimate below this share of its budget
# The share of a link averaging is budgeted, per direction: on a link the codes keep busy (a link-bound
# pipeline is the point of the design) averaging's flows get only what TCP leaves them, so a round is
# paced to this share of the declared rate, not all of it (measured: 10-15 kB/s of a busy 62.5 kB/s).
# Unpaced, a round pushed a whole fragment into one TCP connection at once; it drained at 1-2 kB/s on a
# busy 0.5 Mbit/s link, a write blocked past yamux's 10 s, and the connection closed mid-round.
# On a link the codes keep full this share is what averaging costs the data path (measured: 10% cost
# the scaling lab 8-12% of its tokens/s, 5% cost it 5-6%, 2.5% 3-4%). 1.25% in anchored 2-bit rounds
# averages about as many parameters per second as 2.5% did in 4-bit, 5% in 8-bit and 10% in fp16.
BUDGET_SHARE = 0.0125
GROWTH = 1.25                     # a complete round raises the rate by this factor, up to the budget


def fragment_count(total_params: int, fragment_params: int = FRAGMENT_PARAMS) -> int:
    """How many fragments a stage's parameters are averaged in: one per `fragment_params`. Every
    replica of a stage derives the same count from the same run config, so fragments agree."""
    return max(1, math.ceil(total_params / fragment_params))


def split_fragments(numels: Sequence[int], count: int) -> list[list[int]]:
    """Tensor indices in `count` contiguous groups of about equal size. A tensor is never split, so
    there are no more groups than tensors, and none is empty."""
    count = max(1, min(count, len(numels)))
    total, groups, acc = sum(numels), [[]], 0
    for i, n in enumerate(numels):
        # the next group opens once the groups so far hold their share of the total, or when each
        # tensor left is needed to give every group still to come one
        if groups[-1] and len(groups) < count and (acc >= total * len(groups) / count
                                                   or len(numels) - i <= count - len(groups)):
            groups.append([])
        groups[-1].append(i)
        acc += n
    return groups


def round_wire_bytes(params: int, group: int, bytes_per_value: float = FULL_BYTES) -> int:
    """Bytes one replica sends plus receives in a butterfly all-reduce of `params` values among
    `group` replicas. As a sender, (g-1)/g of its values go out to their reducers and as many come
    back as results; as the reducer of its own 1/g, it receives the g-1 others' copies of that part and
    returns each the result. So (g-1)/g of the values twice in each direction."""
    if group < 2:
        return 0
    return int(4 * params * bytes_per_value * (group - 1) // group)


def transfer_s(params: int, group: int, rate_Bps: float, bytes_per_value: float = FULL_BYTES) -> float:
    """Seconds the transfer of one round takes on a full-duplex link of `rate_Bps` per direction."""
    return round_wire_bytes(params, group, bytes_per_value) / 2 / rate_Bps


@dataclass(frozen=True)
class RoundLimits:
    """hivemind's all-reduce settings for one round, sized to the link instead of fixed seconds."""
    part_bytes: int
    send_Bps: float           # a replica sends its own parts at this rate (all reducers together); the
                              # results it returns as a reducer mirror its senders' pace: its uplink
                              # carries about twice this, the round's rate
    sender_timeout_s: float   # a sender whose next part does not come within this is dropped
    reducer_timeout_s: float  # likewise for a reducer's next averaged part
    allreduce_timeout_s: float
    group: int                # the replicas the round is for: a group starts as soon as it has them all


def round_limits(params: int, group: int, rate_Bps: float) -> RoundLimits:
    """Part size, pace and timeouts for averaging `params` values among `group` replicas at `rate_Bps`
    per direction: own parts go out at half that rate (the returned results take the other half), split
    over the g-1 other reducers, a part taking PART_S to one of them; a silent sender is dropped only
    after half the round."""
    rate = max(rate_Bps, MIN_RATE)
    send = rate / 2
    part = int(min(MAX_PART, max(MIN_PART, send / max(group - 1, 1) * PART_S)))
    between_parts = part * max(group - 1, 1) / send
    total = FLOOR_S + SLACK * transfer_s(params, max(group, 2), rate)
    sender = max(PART_FLOOR_S + SLACK * between_parts, SILENCE_SHARE * total)
    return RoundLimits(part_bytes=part, send_Bps=send, sender_timeout_s=sender, reducer_timeout_s=2 * sender,
                       allreduce_timeout_s=total, group=group)


class LinkRate:
    """The rate, in bytes/s per direction, averaging paces its rounds to (and sizes their timeouts
    for). Starts at the budget, BUDGET_SHARE of the declared rate; like TCP's congestion window it
    grows by GROWTH after each complete round, back up to the budget, and a round that did not complete
    halves it, or lowers it to what that round did achieve if that was less, so the next round sends
    more gently and its timeouts grow at once to what the link showed, down to a quarter of the
    budget (a round whose partner stalled or left shows a rate that says nothing about the link)."""

    def __init__(self, declared_Bps: float, share: float = BUDGET_SHARE):
        self.budget = max(float(declared_Bps) * share, MIN_RATE)
        self.Bps = self.budget

    def complete(self) -> None:
        self.Bps = min(self.budget, self.Bps * GROWTH)

    def incomplete(self, wire_bytes: int = 0, seconds: float = 0.0) -> None:
        achieved = wire_bytes / 2 / seconds if wire_bytes > 0 and seconds > 0 else float("inf")
        self.Bps = max(MIN_RATE, BACKOFF_FLOOR * self.budget, min(self.Bps / 2, achieved))


class Cadence:
    """When a replica's next averaging round starts: at the first local step once `every` steps have
    passed since its last round started, and no round is running. So a round that outlasts `every`
    steps is followed at once, not at the next multiple of `every`: replicas that ran a round together
    finish it together and look for the next one together, and a replica that found no group (its
    partners had formed one without it) looks again at its next step, so it is there when they come
    free (at 3 per stage a third replica used to miss every round of the scaling lab)."""

    def __init__(self, every: int):
        self.every, self.next = every, every - 1

    def due(self, step: int) -> bool:
        return self.every > 0 and step >= self.next

    def started(self, step: int) -> None:
        self.next = step + self.every


def mbit(rate_mbit: float) -> float:
    """Bytes per second of a link of `rate_mbit` Mbit/s."""
    return rate_mbit * 1e6 / 8


def round_cost(params: int, group: int, rate_mbit: float, bytes_per_value: float, fragments: int = 1,
               share: float = 1.0) -> dict:
    """One round's bytes and transfer seconds for one replica using `share` of its link (README's
    computed table)."""
    per_round, rate = math.ceil(params / fragments), mbit(rate_mbit) * share
    return {"params": params, "group": group, "link_mbit": rate_mbit, "bytes_per_value": bytes_per_value,
            "fragments": fragments, "link_share": share,
            "round_bytes": round_wire_bytes(per_round, group, bytes_per_value),
            "round_s": transfer_s(per_round, group, rate, bytes_per_value),
            "all_fragments_s": transfer_s(params, group, rate, bytes_per_value)}
