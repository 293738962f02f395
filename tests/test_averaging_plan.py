"""The averaging scheme's arithmetic (swarm/averaging_plan.py): fragments, bytes, limits, link rate."""
import pytest

from swarm.averaging_plan import (BACKOFF_FLOOR, BUDGET_SHARE, FRAGMENT_PARAMS, GROWTH, MIN_PART, MIN_RATE, PART_S, ANCHORED_BYTES, FULL_BYTES, INT4_BYTES, Cadence,
                                  LinkRate,
                                  fragment_count, mbit, round_cost, round_limits, round_wire_bytes, split_fragments,
                                  transfer_s)


@pytest.mark.parametrize("numels,count", [([10] * 4, 2), ([100, 1, 1, 1], 3), ([1, 1, 1, 100], 2), ([5], 3),
                                          ([3, 7, 2, 9, 4, 4, 1], 3), ([1] * 10, 10)])
def test_fragments_cover_every_tensor_once_in_order(numels, count):
    groups = split_fragments(numels, count)
    assert [i for g in groups for i in g] == list(range(len(numels)))  # contiguous, each tensor once
    assert all(groups) and len(groups) == min(count, len(numels))


def test_fragments_are_about_equal_when_tensors_allow():
    groups = split_fragments([10] * 12, 4)
    assert [len(g) for g in groups] == [3, 3, 3, 3]
    sizes = [sum([7, 3, 5, 5, 6, 4, 2, 8][i] for i in g) for g in split_fragments([7, 3, 5, 5, 6, 4, 2, 8], 4)]
    assert max(sizes) - min(sizes) <= 8, sizes


def test_fragment_count_follows_parameters():
    assert fragment_count(1) == 1 and fragment_count(FRAGMENT_PARAMS) == 1
    assert fragment_count(FRAGMENT_PARAMS + 1) == 2 and fragment_count(250_000_000) == 16


def test_round_bytes_of_a_butterfly_all_reduce():
    assert round_wire_bytes(1000, 1) == 0  # alone: nothing to send
    # 2 replicas: half the values out to the other reducer, their deltas back, and the other's copy of
    # our half in, its delta out: 500 values each of four ways, in 8-bit blocks (a bf16 scale per 256)
    assert round_wire_bytes(1000, 2) == int(4 * 500 * (1 + 2 / 256)) == 2015
    assert round_wire_bytes(1000, 2, bytes_per_value=2) == 4000  # fp16
    assert round_wire_bytes(1000, 4, bytes_per_value=4) == 12000  # 3/4, four ways, in fp32
    assert transfer_s(1_000_000, 2, mbit(8), bytes_per_value=2) == pytest.approx(2.0)  # 2 MB each way at 1 MB/s


def test_limits_grow_with_the_fragment_and_shrink_with_the_link():
    slow, fast = round_limits(250_000, 2, mbit(0.5)), round_limits(250_000, 2, mbit(100))
    assert slow.allreduce_timeout_s > fast.allreduce_timeout_s
    assert slow.part_bytes < fast.part_bytes
    # a round's timeout covers its transfer at the link's rate with room to spare
    assert slow.allreduce_timeout_s > 2 * transfer_s(250_000, 2, mbit(0.5))
    big = round_limits(16_000_000, 2, mbit(0.5))
    assert big.allreduce_timeout_s > 400  # 16 MB at 62.5 kB/s is 258 s each way: no fixed 8 s
    # parts are cut to each reducer's share of the pace: the next part to one comes as soon in a group of 8
    assert round_limits(1, 8, mbit(0.5)).sender_timeout_s == pytest.approx(round_limits(1, 2, mbit(0.5)).sender_timeout_s, rel=1e-3)
    # a sender on a busy link may fall silent for half the round before it is dropped
    assert big.sender_timeout_s >= 0.5 * big.allreduce_timeout_s
    assert big.sender_timeout_s < big.reducer_timeout_s


def test_rounds_are_paced_to_the_rate_in_small_parts():
    slow = round_limits(262_000, 2, mbit(0.5) * BUDGET_SHARE)
    assert slow.send_Bps == pytest.approx(max(MIN_RATE, mbit(0.5) * BUDGET_SHARE) / 2)  # deltas take the rest
    assert slow.part_bytes == MIN_PART  # a few kB: one write never waits long on a busy link
    three = round_limits(262_000, 3, mbit(100) * BUDGET_SHARE)
    assert three.part_bytes == pytest.approx(three.send_Bps / 2 * PART_S, rel=1e-3)  # two reducers share it
    # the round's timeout covers its transfer at the paced rate with room to spare
    assert slow.allreduce_timeout_s > 2 * round_wire_bytes(262_000, 2) / 2 / max(MIN_RATE, mbit(0.5) * BUDGET_SHARE)


def test_link_rate_backs_off_on_incomplete_rounds_and_grows_back_to_its_budget():
    link = LinkRate(mbit(10))
    assert link.Bps == link.budget == pytest.approx(BUDGET_SHARE * mbit(10))  # averaging's share of the link
    assert LinkRate(mbit(10), share=0.3).budget == pytest.approx(0.3 * mbit(10))
    link = LinkRate(mbit(10), share=0.05)
    link.incomplete(wire_bytes=400_000, seconds=10.0)  # a partial round that moved 20 kB/s each way
    assert link.Bps == pytest.approx(20_000, rel=1e-3)  # below half the budget of 62.5 kB/s
    link.complete()
    assert link.Bps == pytest.approx(20_000 * GROWTH, rel=1e-3)
    halved = LinkRate(mbit(10))
    halved.incomplete()  # no rate measured: half the last one
    assert halved.Bps == pytest.approx(halved.budget / 2)
    for _ in range(30):
        link.complete()
    assert link.Bps == pytest.approx(link.budget)  # never above the budget
    for _ in range(100):
        link.incomplete()
    assert link.Bps == pytest.approx(BACKOFF_FLOOR * link.budget)  # floored at a share of the budget
    thin = LinkRate(mbit(0.5), share=0.01)
    thin.incomplete(wire_bytes=10, seconds=10.0)
    assert thin.budget == thin.Bps == MIN_RATE  # 1% of 0.5 Mbit/s is 625 B/s: never below 8 kbit/s


def test_cadence_waits_every_steps_from_a_rounds_start_and_follows_a_long_round_at_once():
    cadence = Cadence(10)
    assert [s for s in range(12) if cadence.due(s)] == [9, 10, 11]  # first after 10 local steps
    cadence.started(9)
    assert [s for s in range(10, 25) if cadence.due(s)] == list(range(19, 25))
    cadence.started(19)  # a round that outlasts 10 steps: due at the first step after it ends (step 35),
    assert cadence.due(35) and not cadence.due(28)  # not at the next multiple of 10 (39)
    cadence.started(35)  # whatever a round did (found no group, ran long), the next is due `every` steps after its start
    assert not cadence.due(44) and cadence.due(45)
    assert not any(Cadence(0).due(s) for s in range(100))  # averaging off


def test_cost_table_halves_bytes_in_fp16_in_8_bit_in_4_bit_and_in_anchored_2_bit_and_fragments_cut_rounds():
    fp32, fp16, frag, int8, int4, int2 = (round_cost(250_000_000, 2, 10, b, f) for b, f in (
        (4, 1), (2, 1), (2, 16), (FULL_BYTES, 16), (INT4_BYTES, 16), (ANCHORED_BYTES, 16)))
    assert fp32["round_bytes"] == 2 * fp16["round_bytes"] == 2_000_000_000
    assert frag["round_bytes"] / int8["round_bytes"] == pytest.approx(2 / FULL_BYTES, rel=1e-6) and FULL_BYTES < 1.01
    assert int8["round_bytes"] / int4["round_bytes"] == pytest.approx(FULL_BYTES / INT4_BYTES, rel=1e-6)
    assert int4["round_bytes"] / int2["round_bytes"] == pytest.approx(INT4_BYTES / ANCHORED_BYTES, rel=1e-6)
    assert FULL_BYTES / INT4_BYTES > 1.95 and INT4_BYTES / ANCHORED_BYTES > 1.9
    assert fp32["round_s"] == pytest.approx(800)  # 1 GB each way at 1.25 MB/s
    assert frag["round_s"] == pytest.approx(fp16["round_s"] / 16) and frag["all_fragments_s"] == fp16["round_s"]


def test_cost_bench_writes_its_computed_table(tmp_path):
    import json

    from bench.averaging_cost import main
    assert main(["--params", "32000000", "--links", "10", "--json-out", str(tmp_path / "c.json")]) == 0
    out = json.loads((tmp_path / "c.json").read_text())
    before, now = out["rows"][0], out["rows"][-1]
    assert out["computed"] and now["fragments"] == 2 and before["fragments"] == 1
    # half the values per round, about a 15th of the bytes each (anchored 2-bit blocks against fp32)
    assert before["round_bytes"] / now["round_bytes"] == pytest.approx(2 * 4 / ANCHORED_BYTES, rel=1e-6)
    assert (tmp_path / "c.png").stat().st_size > 0
