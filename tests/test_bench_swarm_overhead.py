"""bench.swarm_overhead --quick: train-local, a local swarm of real processes and the per-hop RPC overhead,
measured and written (the bench once failed here unnoticed, on an attribute that had moved)."""
import json
import math

from bench import swarm_overhead


def test_quick_swarm_overhead_benchmark(tmp_path, capsys):
    json_out, png_out = tmp_path / "so.json", tmp_path / "so.png"
    assert swarm_overhead.main(["--quick", "--json-out", str(json_out), "--png-out", str(png_out)]) == 0
    res = json.loads(json_out.read_text())
    assert res["train_local"]["tokens_per_s"] > 0 and res["local_swarm"]["tokens_per_s"] > 0
    assert math.isclose(res["ratio"], res["local_swarm"]["tokens_per_s"] / res["train_local"]["tokens_per_s"])
    hop = res["hop"]
    # a forward over libp2p is the same compute plus the call: it cannot be faster than computing it here
    assert 0 < hop["forward_local_ms"] < hop["forward_remote_ms"] and hop["info_rtt_ms"] > 0
    # the codes crossing boundary 0 are smaller than the bf16 hidden state they stand for
    assert res["wire"]["compression_vs_bf16"] > 1
    assert "per-hop measure" in capsys.readouterr().out and png_out.read_bytes()[:4] == b"\x89PNG"
