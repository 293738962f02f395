import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from swarm.checkpoint import atomic_save, load
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.local_trainer import LocalTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--d-model", "64", "--layers", "2", "--heads", "2", "--stages", "2", "--ratio", "16",
        "--seq-len", "32", "--batch-size", "4", "--microbatches", "2"]


@pytest.fixture(scope="module")
def corpus():
    return ByteCorpus(max_bytes=1 << 20)


def _run(corpus, **kw):
    model = ModelConfig(**{**dict(d_model=64, n_layers=2, n_heads=2, seq_len=32, n_stages=2, ratio=16), **kw})
    return LocalTrainer(RunConfig(model=model, train=TrainConfig(batch_size=4, microbatches=2)), corpus)


def test_cli_reports_required_fields(tmp_path):
    out = tmp_path / "s.json"
    subprocess.run([sys.executable, "-m", "node.cli", "train-local", *TINY, "--steps", "12", "--eval-every", "6",
                    "--checkpoint", str(tmp_path / "c.pt"), "--json-out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    s = json.loads(out.read_text())
    for key in ("train_loss_first", "train_loss_last", "val_loss", "tokens_per_s", "code_width",
                "wire_bytes_per_token_fwd", "wire_bytes_per_token_bwd", "compression_vs_bf16", "param_overhead"):
        assert key in s, key
    assert s["code_width"] == 4 and s["wire_bytes_per_token_fwd"] == 8 and s["compression_vs_bf16"] == 16
    assert s["train_loss_last"] < s["train_loss_first"] - 0.5
    assert 0 < s["param_overhead"] < 0.2 and s["tokens_per_s"] > 0


def test_resume_continues_the_same_run(tmp_path, corpus):
    straight = _run(corpus)
    for _ in range(4):
        straight.train_step()
    first = _run(corpus)
    for _ in range(2):
        first.train_step()
    first.save(tmp_path / "c.pt")
    resumed = _run(corpus)
    resumed.resume(tmp_path / "c.pt")
    for _ in range(2):
        resumed.train_step()
    for (n, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_resume_refuses_other_config(tmp_path, corpus):
    _run(corpus).save(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="model.ratio: ours 8, theirs 16"):
        _run(corpus, ratio=8).resume(tmp_path / "c.pt")


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"a": Boom()}, path)
    assert torch.equal(load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        load(tmp_path / "bad.pt")


def test_sigint_saves_checkpoint_and_exits_cleanly(tmp_path):
    ckpt = tmp_path / "c.pt"
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "train-local", *TINY, "--steps", "100000",
                             "--eval-every", "0", "--save-every", "0", "--checkpoint", str(ckpt)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 60
        for line in proc.stderr:  # wait until training really runs
            if "[" in line and "/100000" in line or time.time() > deadline:
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, rest
    assert "Traceback" not in rest and "stopped by SIGINT" in rest
    assert load(ckpt)["step"] > 0
