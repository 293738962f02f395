import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # deterministic, and leaves the second core to peer processes

# `join` without --identity keeps one per run and stage under the data directory: tests and the
# nodes they start (which inherit this) keep theirs in a directory of their own, never the user's
_DATA = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"resbm-test-data-{os.getpid()}")
os.environ["XDG_DATA_HOME"] = _DATA


@pytest.fixture
def tiny():
    from swarm.config import ModelConfig
    return ModelConfig(d_model=64, n_layers=4, n_heads=4, seq_len=16, n_stages=2, ratio=16)
