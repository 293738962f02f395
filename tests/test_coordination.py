"""Step coordination rules: who coordinates, when the barrier goes, how a takeover adopts a plan."""
from swarm.coordination import Barrier, adopt_plan, coordinator, mark_coordinator, next_roster
from swarm.ledger import TrainerLedger, merge_ledgers


def test_coordinator_is_lowest_live_id_and_the_next_one_takes_over():
    live = ["Qc", "Qa", "Qb"]
    assert coordinator(live) == "Qa"
    assert coordinator(live, suspected={"Qa"}) == "Qb"
    assert coordinator(live, suspected={"Qa", "Qb", "Qc"}) is None
    assert coordinator([]) is None


def test_barrier_waits_for_the_roster_then_gives_up_on_the_absent():
    b = Barrier(step=7, roster=("A", "B", "C"), deadline=10.0)
    assert b.outcome({"A", "B"}, now=5.0) == (False, ("C",))
    assert b.outcome({"A", "B", "C"}, now=5.0) == (True, ())
    assert b.outcome({"A", "B", "C", "D"}, now=5.0) == (True, ())   # a joiner is welcome, never awaited
    assert b.outcome({"A"}, now=10.0) == (True, ("B", "C"))


def plan(step, owners, live):
    ledgers = [TrainerLedger(o, step, 2, {i: (o, "t")}) for i, o in enumerate(owners)]
    return merge_ledgers(step, ledgers, live, 2)


def test_takeover_adopts_a_handed_out_plan_and_settles_conflicts_deterministically():
    first = plan(3, ["A", "B"], {"A", "B"})
    assert adopt_plan(3, [None, first]) == (first, False)
    assert adopt_plan(4, [first]) == (None, False)            # a plan of another step is no use
    assert adopt_plan(3, []) == (None, False)
    second = plan(3, ["A", "B"], {"A"})                       # computed without B's ledger
    chosen, conflict = adopt_plan(3, [first, second])
    assert conflict and chosen == min((first, second), key=lambda p: p.digest())
    assert adopt_plan(3, [second, first])[0] == chosen        # order of arrival does not matter


def test_next_roster_drops_the_absent_and_takes_in_joiners():
    assert next_roster(live=["A", "B", "C"], reported={"A", "B"}, absent=("C",)) == ("A", "B")
    assert next_roster(live=["A", "B"], reported={"A", "B", "D"}, absent=()) == ("A", "B", "D")
    assert next_roster(live=["A", "E"], reported={"A"}, absent=()) == ("A", "E")


def test_the_trainer_that_closed_the_most_steps_is_marked_coordinator():
    nodes = [{"stage": 0, "steps_closed": 3}, {"stage": 0, "steps_closed": 17}, {"stage": 0},
             {"stage": 1, "role": "middle"}]
    assert [n["role"] for n in mark_coordinator(nodes)] == ["trainer", "coordinator", "trainer", "middle"]
    assert [n["role"] for n in mark_coordinator([{"stage": 0}, {"stage": 0, "steps_closed": 0}])] == ["trainer"] * 2
