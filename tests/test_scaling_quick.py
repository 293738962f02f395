"""bench.scaling --quick really trains 1 and 2 volunteers per stage on shaped links, and its JSON is
complete and consistent (no speed assertion: this machine's cores are shared). Root only."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.netns import PREFIX, require_root_netns

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.swarm
FIELDS = ("per_stage", "link_mbit", "tokens_per_s", "compute_bound_tokens_per_s", "busiest_node_bytes_per_token",
          "middle_stage_bytes_per_token", "trainer_bytes_per_token", "averaging_bytes_per_token")


def _our_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)}


def test_quick_scaling_json_is_complete_and_consistent(tmp_path):
    reason = require_root_netns()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    before = _our_namespaces()
    res = subprocess.run([sys.executable, "-m", "bench.scaling", "--quick", "--json-out", str(tmp_path / "s.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "s.json").read_text())
    runs = out["runs"]
    assert sorted(r["per_stage"] for r in runs) == [1, 2]
    for r in runs:
        assert not r.get("error"), r["error"]
        assert all(k in r for k in FIELDS), set(FIELDS) - set(r)
        assert r["tokens_per_s"] > 0 and r["compute_bound_tokens_per_s"] > 0 and r["steps"] >= 3
        assert r["busiest_node_bytes_per_token"] > 0 and r["middle_stage_bytes_per_token"] > 0
        assert r["trainer_bytes_per_token"] > 0 and r["averaging_bytes_per_token"] >= 0
        assert r["trainer_bytes_per_token"] <= r["middle_stage_bytes_per_token"]
        assert r["busiest_node_bytes_per_token"] >= r["middle_stage_bytes_per_token"]
        assert r["skipped_microbatches"] == 0 and r["staleness"] >= 0 and 0 < r["cpu_busy"] <= 1
        assert len(r["trainer_tokens_per_s"]) == r["per_stage"]  # every trainer's rate, summed
        assert r["tokens_per_s"] == pytest.approx(sum(r["trainer_tokens_per_s"]))
        # every node of every stage answered, and its link (interface counters) carried at least its messages
        assert sorted(n["stage"] for n in r["nodes"]) == sorted(list(range(3)) * r["per_stage"])
        assert all(n["iface_bytes"] >= n["message_bytes"] > 0 for n in r["nodes"])
        # the lab's per-peer counters: every node received its data path's bytes from an adjacent stage
        assert all(n["bytes_per_token_by_peer"]["adjacent"]["received"] > 0 and 0 <= n["dropped_share"] < 1
                   for n in r["nodes"]), [(n["role"], n.get("bytes_per_token_by_peer")) for n in r["nodes"]]
    by = {r["per_stage"]: r for r in runs}
    assert by[2]["averaging_bytes_per_token"] > 0  # the 2-per-stage quick row averages every 2 steps
    # ... and its replicas count what their rounds carried, and whether each came back whole
    assert by[2]["averaging_rounds"] + by[2]["averaging_partial_rounds"] > 0, by[2]
    assert by[2]["averaging_payload_bytes_per_token"] > 0 and 0 < by[2]["averaging_link_share"] < 1
    # every round that formed a group was a pair (2 replicas per stage), counted by each of the two
    groups = by[2]["averaging_groups"]
    assert set(groups) == {"2"} and groups["2"] == by[2]["averaging_rounds"] + by[2]["averaging_partial_rounds"]
    assert sum(by[2]["averaging_kinds"].values()) == groups["2"], by[2]  # each anchored or full
    assert 0 <= by[2]["averaging_in_flight"] <= 6, by[2]
    assert out["speedup_2"] == pytest.approx(by[2]["tokens_per_s"] / by[1]["tokens_per_s"])
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert _our_namespaces() <= before  # nothing left behind
