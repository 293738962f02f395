"""Trainers' data streams: disjoint, deterministic, and stream 0 is train-local's data."""
import pytest
import torch

from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.shards import batch_key, data_stream
from swarm.local_trainer import LocalTrainer


def draw(corpus, run, index: int, stream: int = 0, split: str = "train"):
    """(inputs, targets) of the `index`-th microbatch of `stream`."""
    step, slot = batch_key(index, run.train.microbatches, stream)
    return corpus.batch(split, run.train.microbatch_size, run.model.seq_len, run.model.seed, step, slot)


def test_streams_never_share_a_batch_key():
    keys = {(s, batch_key(i, 4, s)) for s in range(5) for i in range(40)}
    assert len({k for _, k in keys}) == len(keys)
    assert batch_key(5, 4, 0) == (1, 1) and batch_key(5, 4, 2) == (1, 9)


def test_default_stream_is_stable_and_never_train_locals():
    ids = [f"Qm{i}" for i in range(200)]
    assert [data_stream(p) for p in ids] == [data_stream(p) for p in ids]
    assert all(s > 0 for s in map(data_stream, ids))
    assert len(set(map(data_stream, ids))) == len(ids)


def test_stream_zero_is_train_locals_data_and_others_differ():
    run = RunConfig(model=ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16, n_stages=2, ratio=8),
                    train=TrainConfig(batch_size=8, microbatches=4))
    corpus = ByteCorpus(max_bytes=1 << 18)
    ref = LocalTrainer(run, corpus)
    for index in range(8):
        x, y = draw(corpus, run, index)
        rx, ry = ref.microbatch("train", index // 4, index % 4)
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert not torch.equal(draw(corpus, run, 0, stream=1)[0], draw(corpus, run, 0)[0])


def test_bad_keys_are_refused():
    with pytest.raises(ValueError):
        batch_key(0, 0, 0)
    with pytest.raises(ValueError):
        batch_key(-1, 4, 0)
