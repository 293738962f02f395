"""The bandwidth harness really shapes links and cleans up after itself (quick mode, root only)."""
import json
import os
import subprocess
import sys

import pytest

from bench.netns import PREFIX, require_root_netns
from protocol.codec import bytes_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.swarm


def _our_namespaces():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def test_quick_bandwidth_run_is_shaped_and_clean(tmp_path):
    reason = require_root_netns()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    before = set(_our_namespaces())
    res = subprocess.run([sys.executable, "-m", "bench.bandwidth", "--quick", "--json-out", str(tmp_path / "b.json"),
                          "--png-out", str(tmp_path / "b.png")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "b.json").read_text())
    assert abs(out["shaping_check"]["10.0"] - 10.0) <= 2.0  # the links really are 10 Mbit/s
    by = {r["variant"]: r for r in out["results"]}
    assert by["resbm-128x"]["steps"] >= 3 and by["none"]["steps"] >= 3
    # the swarm in the namespaces sent exactly the codec's bytes: b=4 bf16 vs full width 64 bf16 (backward:
    # gradients only; forward also carries the targets to the tail), and whole messages add a little
    for variant, width in (("resbm-128x", 4), ("none", 64)):
        r = by[variant]
        assert r["code_bytes_per_token_bwd"] == bytes_per_token("bf16", width)
        assert r["code_bytes_per_token_fwd"] > bytes_per_token("bf16", width)
        assert r["code_bytes_per_token_fwd"] < r["wire_bytes_per_token_fwd"] < 1.5 * r["code_bytes_per_token_fwd"]
    assert all(r["skipped_microbatches"] == 0 for r in out["results"])
    assert out["latency_emulated"] is False
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert set(_our_namespaces()) <= before  # nothing left behind
