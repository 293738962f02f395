import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # deterministic, and leaves the second core to peer processes


@pytest.fixture
def tiny():
    from swarm.config import ModelConfig
    return ModelConfig(d_model=64, n_layers=4, n_heads=4, seq_len=16, n_stages=2, ratio=16)
