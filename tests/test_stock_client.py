"""A stock hivemind client (examples/stock_client.py, hivemind's public API only, its own process)
discovers a stage in the DHT and calls it; hostile inputs get clear refusals while the swarm trains."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.local_swarm import Swarm
from swarm_helpers import trainer_steps, tiny_run

pytestmark = pytest.mark.swarm
ROOT = Path(__file__).resolve().parent.parent


def stock_client(peers, *flags, identity=None):
    argv = [sys.executable, str(ROOT / "examples" / "stock_client.py"), "--initial-peers", *peers,
            "--run-id", "stock", "--stage", "1", *flags, *(["--identity", identity] if identity else [])]
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180, start_new_session=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_stock_hivemind_client_discovers_calls_and_is_refused_clearly(tmp_path):
    swarm = Swarm(tmp_path, 1, tiny_run("stock"))  # an open swarm: no trainer list, so a stranger may train
    try:
        peers = swarm.start_bootstrap()
        for stage in (1, 2):
            swarm.start_stage(f"stage{stage}", stage, peers)
        for name in ("stage1", "stage2"):
            swarm.wait_for_line(name, "serving", 120)

        first = stock_client(peers, "--train")
        assert len(first["replicas"]) == 1 and first["code_width"] == 4
        assert first["eval_forward_shape"] == [2, 32, 4]
        assert "'backward' is not served" in first["stock_backward"]
        assert "needs ExpertRequest.metadata and goes through rpc_train" in first["stock_backward"]
        # one rpc_train call walked stage 1 -> the tail and back: x's gradient and the route taken
        train = first["train"]
        assert "refused" not in train, train
        assert train["grad_shape"] == [2, 32, 4] and train["loss"] > 0
        assert len(train["route"]) == 2 and train["route"][0] == first["replicas"][0]

        swarm.start_trainer(0, peers, 100000, extra=["--eval-every", "0"])
        log = tmp_path / "trainer0.log"
        deadline = time.time() + 120
        while trainer_steps(log) < 2 and time.time() < deadline:
            time.sleep(1)
        before = trainer_steps(log)
        assert before >= 2, log.read_text()[-2000:]
        second = stock_client(peers, "--hostile")
        deadline = time.time() + 60  # the trainer goes on: its next step, however loaded the machine
        while trainer_steps(log) <= before and time.time() < deadline:
            time.sleep(1)
        after = trainer_steps(log)
    finally:
        swarm.stop()
    hostile = second["hostile"]
    assert "nonfinite" in hostile["nan"] and "nonfinite" in hostile["inf"]
    assert "shape" in hostile["width_b_plus_1"] and "carries 4 values per token" in hostile["width_b_plus_1"]
    assert "codec" in hostile["int64"] and "float32, bfloat16 or float16" in hostile["int64"]
    assert "size" in hostile["batch_1e5"]
    assert "shape" in hostile["zero_length"]
    assert after > before  # the swarm kept training through it
