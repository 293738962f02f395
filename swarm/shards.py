"""Which sequences each trainer feeds in a step, so that trainers never overlap.

A step's global batch is `train.microbatches` slots, exactly the microbatches the single-process
trainer draws (swarm/data.py: a pure function of seed, split, step and slot). The step's roster
(the sorted trainer peer ids that feed it; swarm/coordination.py) deals the slots out round-robin:
the trainer of rank r takes the slots i with i % len(roster) == r. So every slot is fed by exactly
one trainer of the roster, the data does not depend on how many trainers there are, and a swarm's
step sees the same batch as `train-local`'s step (the parity test relies on it). A trainer outside
the roster (it joined mid-step) feeds nothing until the next roster names it.
"""
from __future__ import annotations


def slots_for(trainer: str, roster, microbatches: int) -> tuple[int, ...]:
    """The slots (global micro indices) `trainer` feeds in a step with this roster."""
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    roster = sorted(set(roster))
    if trainer not in roster:
        return ()
    rank = roster.index(trainer)
    return tuple(range(rank, microbatches, len(roster)))


def deal(roster, microbatches: int) -> dict[str, tuple[int, ...]]:
    """Every roster member's slots; members beyond `microbatches` get none (and the log should say so)."""
    return {t: slots_for(t, roster, microbatches) for t in sorted(set(roster))}


def idle_trainers(roster, microbatches: int) -> list[str]:
    """Trainers the roster cannot use: there are fewer slots than trainers."""
    return [t for t, s in deal(roster, microbatches).items() if not s]


def draw(corpus, run, step: int, micro: int, split: str = "train"):
    """(inputs, targets) of slot `micro` of `step`: the same tensors LocalTrainer.microbatch draws."""
    if not 0 <= micro < run.train.microbatches:
        raise ValueError(f"slot {micro} is outside the step's {run.train.microbatches} microbatches")
    return corpus.batch(split, run.train.microbatch_size, run.model.seq_len, run.model.seed, step, micro)
