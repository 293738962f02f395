"""Who closes a step, without a fixed head: the step coordinator is the lowest live trainer peer id.

Trainers are stage 0 replicas and announce themselves like every stage (records under
"<run_id>.0"); a trainer also counts as live the trainers that called it lately (node/trainer.py),
since two that start together may miss each other in their first DHT reads. At the end of step s
every trainer sends its ledger to the coordinator of the moment; the coordinator waits for the
step's roster (the trainers expected to feed it) or its barrier deadline, merges the ledgers
(swarm/ledger.py) and steps every replica with the plan. Replicas keep the plan they applied: a
trainer whose coordinator did not answer sends its ledger to the next lowest id, which adopts a
plan some replica already applied, so no step is ever applied under two different plans.
Pure rules: the node layer feeds records, clocks and replies.
"""
from __future__ import annotations

from dataclasses import dataclass

from swarm.ledger import ApplyPlan


def coordinator(live, suspected=()) -> str | None:
    """The step coordinator: the lowest live trainer id not suspected of being gone (None: no trainer)."""
    candidates = sorted(set(live) - set(suspected))
    return candidates[0] if candidates else None


@dataclass(frozen=True)
class Barrier:
    """The coordinator's wait for ledgers: go when the roster reported or the deadline passed."""
    step: int
    roster: tuple      # trainers expected to report (the plan of step-1 named them)
    deadline: float    # clock time after which absent trainers are presumed gone

    def outcome(self, reported, now: float) -> tuple[bool, tuple]:
        """(go now?, roster members that did not report). Reports from outside the roster (a trainer
        that joined mid-step) are welcome but never waited for."""
        absent = tuple(sorted(set(self.roster) - set(reported)))
        return (not absent or now >= self.deadline), absent


def adopt_plan(step: int, known) -> tuple[ApplyPlan | None, bool]:
    """A taking-over coordinator's choice among plans of `step` that trainers (or the DHT) already
    hold: (the plan to reuse or None to compute a fresh one, whether the known plans conflicted).
    Two plans for one step only exist if a coordinator died between handing it out and a takeover
    that could not see it; the lowest digest then wins everywhere, deterministically."""
    plans = {p.digest(): p for p in known if p is not None and p.step == step}
    if not plans:
        return None, False
    return plans[min(plans)], len(plans) > 1


def next_roster(live, reported, absent) -> tuple:
    """Trainers that feed step s+1: every trainer that reported step s (a joiner reports an empty
    ledger to get in) or has a live record, minus the roster members that missed the barrier --
    their records may outlive them by a TTL, and waiting for them again would stall every step.
    A trainer dropped by mistake reports an empty ledger next step and is back a step later."""
    return tuple(sorted((set(live) | set(reported)) - set(absent)))


def mark_coordinator(nodes: list[dict]) -> list[dict]:
    """The trainer that closed the most steps is the run's coordinator (takeovers may make several)."""
    closed = [n.get("steps_closed", 0) for n in nodes if n["stage"] == 0]
    most = max(closed, default=0)
    for n in nodes:
        if n["stage"] == 0:
            n["role"] = "coordinator" if most and n.get("steps_closed", 0) == most else "trainer"
    return nodes
