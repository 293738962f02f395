"""The learning rate schedule: linear warm-up, then constant (the default, as before) or a cosine/linear
decay to min_lr whose horizon is fixed in the run config (not the local --steps)."""
import math

import pytest

from swarm.config import ConfigError, TrainConfig
from swarm.optim import lr_at


def test_constant_after_warmup_is_the_default():
    cfg = TrainConfig(lr=1e-3, warmup_steps=4)
    assert [lr_at(cfg, s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert lr_at(cfg, 10 ** 6) == 1e-3


def test_cosine_and_linear_decay_to_min_lr():
    cos = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, lr_schedule="cosine", decay_steps=110)
    lin = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, lr_schedule="linear", decay_steps=110)
    assert lr_at(cos, 9) == lr_at(lin, 9) == pytest.approx(1e-3)  # warm-up ends at the peak
    assert lr_at(cos, 59) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway
    assert lr_at(lin, 59) == pytest.approx(5.5e-4)
    assert lr_at(cos, 109) == lr_at(lin, 109) == pytest.approx(1e-4) == lr_at(cos, 5000)
    lrs = [lr_at(cos, s) for s in range(10, 110)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_the_decay_horizon_defaults_to_the_steps_and_is_checked():
    assert TrainConfig(lr_schedule="cosine", steps=300).decay_steps == 300
    assert TrainConfig(steps=300).decay_steps == 0  # constant: no horizon, the default fingerprint's field
    with pytest.raises(ConfigError, match="min_lr=0.01 must be between 0 and lr=0.003"):
        TrainConfig(min_lr=0.01)
    with pytest.raises(ConfigError, match="decay_steps=10 must exceed warmup_steps=20"):
        TrainConfig(lr_schedule="linear", decay_steps=10)
    with pytest.raises(ConfigError, match="lr_schedule='step'"):
        TrainConfig(lr_schedule="step")
