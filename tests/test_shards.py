"""Trainers' shards: every slot of a step fed by exactly one trainer, with train-local's data."""
import pytest
import torch

from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.shards import deal, draw, idle_trainers, slots_for
from swarm.trainer import LocalTrainer


@pytest.mark.parametrize("n_trainers", [1, 2, 3, 4])
def test_slots_partition_the_step(n_trainers):
    roster = [f"Q{i}" for i in range(n_trainers)]
    dealt = deal(roster, 8)
    flat = sorted(s for slots in dealt.values() for s in slots)
    assert flat == list(range(8))                                  # each slot exactly once
    sizes = [len(s) for s in dealt.values()]
    assert max(sizes) - min(sizes) <= 1                            # balanced


def test_slots_depend_on_the_sorted_roster_not_its_order():
    assert slots_for("Qb", ["Qc", "Qb", "Qa"], 6) == (1, 4)
    assert slots_for("Qb", ["Qa", "Qb", "Qc", "Qb"], 6) == (1, 4)
    assert slots_for("Qz", ["Qa", "Qb"], 6) == ()                  # not in the roster: feeds nothing


def test_more_trainers_than_slots_leaves_some_idle():
    assert idle_trainers(["A", "B", "C"], 2) == ["C"]
    with pytest.raises(ValueError):
        slots_for("A", ["A"], 0)


def test_draw_is_the_reference_trainers_microbatch(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(32, 127)) * 200)
    corpus = ByteCorpus(str(text))
    run = RunConfig(model=ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16, n_stages=2, ratio=16),
                    train=TrainConfig(batch_size=8, microbatches=4))
    ref = LocalTrainer(run, corpus)
    for trainer, slots in deal(["A", "B"], 4).items():
        for micro in slots:
            x, y = draw(corpus, run, 3, micro)
            rx, ry = ref.microbatch("train", 3, micro)
            assert torch.equal(x, rx) and torch.equal(y, ry)
    assert not torch.equal(draw(corpus, run, 3, 0)[0], draw(corpus, run, 3, 1)[0])
    with pytest.raises(ValueError, match="outside"):
        draw(corpus, run, 3, 4)
