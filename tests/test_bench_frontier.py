"""bench.frontier --quick: every grid point trains, byte counts are exact, the front and the goal follow from the numbers."""
import json
import math

from bench import frontier
from protocol.codec import bytes_per_token


def test_quick_frontier_benchmark(tmp_path, capsys):
    json_out, png_out = tmp_path / "f.json", tmp_path / "f.png"
    assert frontier.main(["--quick", "--jobs", "2", "--json-out", str(json_out), "--png-out", str(png_out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(json_out.read_text())
    preset = frontier.PRESETS["quick"]
    d = preset["model"]["d_model"]
    tokens = preset["train"]["batch_size"] // preset["train"]["microbatches"] * preset["model"]["seq_len"]

    points = res["points"]
    assert [(p["b"], p["codec_fwd"]) for p in points] == [(s["b"], s["codec_fwd"]) for s in frontier.point_specs(preset)]
    assert len(points) == len(preset["widths"]) * len(preset["codecs"]) + len(preset["mixed"]) + 2
    assert any(p["codec_fwd"] != p["codec_bwd"] for p in points)
    for p in points:
        assert set(p) >= {"b", "codec_fwd", "codec_bwd", "bytes_fwd", "bytes_bwd", "val_loss", "gap_vs_none_pct"}
        assert math.isfinite(p["val_loss"]) and math.isfinite(p["gap_vs_none_pct"])
        assert p["bytes_fwd"] == bytes_per_token(p["codec_fwd"], p["b"], tokens)
        assert p["bytes_bwd"] == bytes_per_token(p["codec_bwd"], p["b"], tokens)
    by = {p["name"]: p for p in points}
    # b=2 in int4: 1 data byte per token + 2 bf16 scales per message of 64 tokens
    assert by["resbm b=2 int4ch"]["bytes_fwd"] == 1 + 4 / 64
    assert by["none"]["bytes_fwd"] == 2 * d and by["none"]["gap_vs_none_pct"] == 0
    assert by["full width int8"]["bytes_fwd"] == d + 2

    best = res["best_at_128x_bytes"]
    fits = [p for p in points if p["bytes_fwd"] <= 2 * d / 128]
    assert best["val_loss"] == min(p["val_loss"] for p in fits) and best["bytes_fwd"] <= 2
    front = [by[n] for n in res["pareto_front"]]
    for p in points:  # nothing off the front beats a front point on both axes
        assert any(f["bytes_fwd"] + f["bytes_bwd"] <= p["bytes_fwd"] + p["bytes_bwd"] and f["val_loss"] <= p["val_loss"]
                   for f in front)
    assert len(res["repeats"]) == 3 and res["repeats"][0]["name"] == "none"
    assert all(r["seeds"] == [0, 1] and math.isfinite(r["spread"]) for r in res["repeats"])
    assert res["goal"]["met"] in (True, False) and res["jobs"] == 2
    assert "| resbm b=1 int4ch" in printed and "Goal" in printed
    assert png_out.read_bytes()[:4] == b"\x89PNG" and png_out.stat().st_size > 10_000


def test_pareto_front_and_budget_choice():
    pts = [dict(name=n, bytes_fwd=f, bytes_bwd=f, val_loss=v) for n, f, v in
           [("a", 1, 2.0), ("b", 2, 2.5), ("c", 4, 1.5), ("d", 8, 1.5), ("e", 16, 1.0)]]
    assert [p["name"] for p in frontier.pareto_front(pts)] == ["a", "c", "e"]
    assert frontier.best_within(pts, 4)["name"] == "c" and frontier.best_within(pts, 0.5) is None
