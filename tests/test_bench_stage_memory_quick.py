"""bench.stage_memory --quick measures real processes holding 4 and 16 microbatches in flight and
writes a complete JSON and a plot (the growth goal itself is the benchmark's verdict, not a test)."""
import json

from bench import stage_memory


def test_quick_stage_memory(tmp_path, capsys):
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    assert stage_memory.main(["--quick", "--json-out", str(out), "--png-out", str(png)]) == 0
    res = json.loads(out.read_text())
    low, high = res["rows"]
    assert (low["inflight"], high["inflight"]) == (4, 16)
    assert low["recomputed"] == 0 and high["recomputed"] >= 12   # beyond a step's worth, graphs are dropped
    assert high["steps"] == low["steps"] + 3                      # 12 more backwards, a step every 4
    assert res["growth_bytes"] == high["peak_above_baseline_bytes"] - low["peak_above_baseline_bytes"]
    assert "in flight adds" in capsys.readouterr().out and png.read_bytes()[:4] == b"\x89PNG"
