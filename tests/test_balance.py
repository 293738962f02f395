from swarm.balance import move_target, pick_stage, quality, stage_totals


def rec(t):
    return {"throughput": t}


def test_newcomer_picks_weakest_stage_then_fewest_replicas():
    records = {1: [rec(2.0), rec(2.0)], 2: [rec(1.0)], 3: [rec(3.0)]}
    totals = stage_totals(records, range(1, 4))
    assert totals == {1: (4.0, 2), 2: (1.0, 1), 3: (3.0, 1)}
    assert pick_stage(totals) == 2
    assert pick_stage(stage_totals({1: [rec(1.0)], 2: [rec(0.5), rec(0.5)], 3: []}, range(1, 4))) == 3
    assert pick_stage({1: (1.0, 2), 2: (1.0, 1)}) == 2


def test_quality():
    assert quality({1: (2.0, 1), 2: (2.0, 1)}) == 1.0
    assert quality({1: (1.0, 1), 2: (3.0, 3)}) == 0.5
    assert quality({1: (0.0, 0), 2: (3.0, 3)}) == 0.0


def test_moves_only_when_unbalanced_and_it_clearly_helps():
    unbalanced = {1: (3.0, 3), 2: (1.0, 1)}
    assert move_target(unbalanced, mine=1, my_throughput=1.0) == 2
    assert move_target(unbalanced, mine=2, my_throughput=1.0) is None        # last replica of its stage stays
    assert move_target({1: (2.0, 2), 2: (2.0, 2)}, mine=1, my_throughput=1.0) is None  # balanced
    # a move that only swaps which stage is short would flap: hysteresis keeps the node in place
    assert move_target({1: (2.0, 2), 2: (1.0, 1)}, mine=1, my_throughput=1.0) is None
    # even when noisy estimates say it would help, a move must not leave the target with more replicas
    assert move_target({1: (9.0, 2), 2: (1.0, 1)}, mine=1, my_throughput=1.0) is None
    assert move_target({1: (9.0, 3), 2: (1.0, 1)}, mine=1, my_throughput=3.0) == 2
    # an empty stage is always filled, even by a replica whose (noisy) throughput is tiny
    assert move_target({1: (929.5, 3), 2: (0.0, 0)}, mine=1, my_throughput=4.4) == 2
