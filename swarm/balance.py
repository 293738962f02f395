"""Which stage a node should serve. Pure functions of the stage records, so every rule is testable.

A pipeline runs at the speed of its slowest stage, so the swarm's throughput is min over stages of
the summed throughput of that stage's replicas (microbatches/s). Balance quality is that minimum
divided by what an even split of the same total would give: 1.0 is perfectly balanced. A node moves
only when quality is below a threshold AND its move would raise quality by a clear margin
(hysteresis), and never to a stage that would then have more replicas than the one it leaves
(throughput estimates are noisy; replica counts are not), so nodes do not flap (Petals moves
below ~0.75).
"""
from __future__ import annotations


def stage_totals(records: dict[int, list[dict]], stages: range) -> dict[int, tuple[float, int]]:
    """stage -> (summed throughput, replica count) for every stage in `stages`."""
    return {k: (sum(r["throughput"] for r in records.get(k, [])), len(records.get(k, []))) for k in stages}


def pick_stage(totals: dict[int, tuple[float, int]]) -> int:
    """The stage a newcomer should serve: lowest total throughput, then fewest replicas, then lowest index."""
    return min(totals, key=lambda k: (totals[k][0], totals[k][1], k))


def quality(totals: dict[int, tuple[float, int]]) -> float:
    values = [t for t, _ in totals.values()]
    if not values or sum(values) <= 0:
        return 0.0
    return min(values) / (sum(values) / len(values))


def move_target(totals: dict[int, tuple[float, int]], mine: int, my_throughput: float,
                threshold: float = 0.75, margin: float = 0.1) -> int | None:
    """The stage this node should move to, or None to stay."""
    before = quality(totals)
    if before >= threshold or totals[mine][1] < 2:  # balanced enough, or we are our stage's last replica
        return None
    target = pick_stage({k: v for k, v in totals.items() if k != mine})
    if totals[target][1] + 1 > totals[mine][1] - 1:
        return None
    if totals[target][1] == 0:  # a stage nobody serves stalls the whole pipeline: fill it, whatever the numbers
        return target
    after = dict(totals)
    after[mine] = (totals[mine][0] - my_throughput, totals[mine][1] - 1)
    after[target] = (totals[target][0] + my_throughput, totals[target][1] + 1)
    return target if quality(after) > before + margin else None
