"""Per-node link arithmetic of the neighbour route (the model bench.scaling checks its figures against)."""
import argparse

import pytest

from bench.wire_budget import Link, averaging_bytes, code_bytes, hub_codes_per_token, link_bound_tokens_per_s


def test_trainer_carries_no_more_than_a_middle_stage():
    trainer, middle, tail = (code_bytes(r, code=32, grad=32, targets=1) for r in ("trainer", "middle", "tail"))
    assert trainer == Link(33, 32) and tail == Link(32, 33)
    assert middle == Link(65, 65)
    assert trainer.total <= middle.total and tail.total <= middle.total
    with pytest.raises(ValueError):
        code_bytes("head", 1, 1, 1)


def test_averaging_share_per_handled_token():
    assert averaging_bytes(250_000, 1, 10, 4096) == Link(0.0, 0.0)
    assert averaging_bytes(250_000, 2, 0, 4096) == Link(0.0, 0.0)
    two = averaging_bytes(250_000, 2, 20, 4096)          # 1 MB each way per round over 40960 handled tokens
    assert two.sent == pytest.approx(1_000_000 / 40_960)
    three = averaging_bytes(250_000, 3, 20, 4096)
    assert three.sent == pytest.approx(2 * 2 / 3 * 1_000_000 / (20 * 4096 / 3))
    with pytest.raises(ValueError):
        averaging_bytes(1, 0, 1, 1)


def test_link_bound_throughput_scales_with_replicas_until_averaging_bites():
    rate = 62_500.0                                   # 0.5 Mbit/s in bytes/s
    per_node = {r: code_bytes(r, 32, 32, 1) for r in ("trainer", "middle", "tail")}
    one = link_bound_tokens_per_s(rate, per_node, 1)
    assert one == pytest.approx(rate / 65)
    with_avg = {r: link + averaging_bytes(250_000, 2, 20, 4096) for r, link in per_node.items()}
    two = link_bound_tokens_per_s(rate, with_avg, 2)
    assert two / one == pytest.approx(2 * 65 / (65 + 1_000_000 / 40_960))   # ~1.45: averaging eats the gain
    rare = {r: link + averaging_bytes(250_000, 2, 100, 4096) for r, link in per_node.items()}
    assert link_bound_tokens_per_s(rate, rare, 2) / one > 1.8
    assert link_bound_tokens_per_s(rate, {"x": Link(0, 0)}, 1) == float("inf")


def test_hub_codes_grow_with_stages():
    assert [hub_codes_per_token(s) for s in (2, 3, 4, 8)] == [2, 5, 8, 20]
    with pytest.raises(ValueError):
        hub_codes_per_token(1)


def test_scaling_rows_are_read_as_per_stage_and_cadence_and_bad_ones_refused():
    from bench.scaling import row_spec

    assert row_spec("2:10") == (2, 10) and row_spec("3:0") == (3, 0)
    for bad in ("2", "0:10", "2:-1", "a:b", "2:10:1"):
        with pytest.raises(argparse.ArgumentTypeError, match="PER_STAGE:AVERAGE_EVERY"):
            row_spec(bad)
