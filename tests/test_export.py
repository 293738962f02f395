"""A swarm's work survives it: stage checkpoints -> one export file -> the reference model."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.swarm
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--d-model", "64", "--layers", "3", "--heads", "2", "--ratio", "16", "--seq-len", "32",
        "--batch-size", "4", "--microbatches", "2", "--stages", "3"]


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "node.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_export_from_checkpoints_matches_swarm_and_generates(tmp_path):
    res = cli("local", *TINY, "--steps", "8", "--eval-every", "0", "--run-dir", str(tmp_path / "run"),
              "--json-out", str(tmp_path / "s.json"))
    assert res.returncode == 0, res.stderr[-2000:]
    swarm = json.loads((tmp_path / "s.json").read_text())
    ckpts = list((tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert len(ckpts) == 3  # the trainer + two stages, written on clean exit
    res = cli("export", "--checkpoints", str(tmp_path / "run" / "checkpoints"), "--out", str(tmp_path / "m.st"))
    assert res.returncode == 0, res.stderr
    res = cli("train-local", "--init-from", str(tmp_path / "m.st"), "--steps", "0", "--checkpoint", "",
              "--json-out", str(tmp_path / "eval.json"))
    assert res.returncode == 0, res.stderr[-2000:]
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    # the reference model with the exported weights scores the validation set exactly as the swarm did
    assert abs(evaluated["val_loss"] - swarm["val_loss"]) < 1e-4
    assert evaluated["fingerprint"] == swarm["fingerprint"]
    res = cli("generate", "--model", str(tmp_path / "m.st"), "--prompt", "import ", "--tokens", "20")
    assert res.returncode == 0 and res.stdout.startswith("import ") and len(res.stdout) > 10
    bad = cli("export", "--checkpoints", str(tmp_path / "run" / "checkpoints" / ckpts[0].name), "--out",
              str(tmp_path / "x.st"))
    assert bad.returncode != 0 and "no state for stage(s)" in bad.stderr
