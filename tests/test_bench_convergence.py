"""bench.convergence --quick: every variant trains, numbers are finite and consistent, files are written."""
import json
import math

from bench import convergence
from swarm.config import RunConfig
from swarm.local_trainer import wire_stats


def test_quick_convergence_benchmark(tmp_path, capsys):
    json_out, png_out = tmp_path / "conv.json", tmp_path / "conv.png"
    assert convergence.main(["--quick", "--json-out", str(json_out), "--png-out", str(png_out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(json_out.read_text())

    expected = {(v["name"], v["optimizer"]) for v in convergence.variants(16)}
    got = {(v["name"], v["optimizer"]) for v in res["variants"]}
    assert got == expected and len(res["variants"]) == 8

    for v in res["variants"]:
        assert all(math.isfinite(x) for x in v["val_curve"]["loss"]), v["name"]
        assert math.isfinite(v["val_loss"]) and v["val_loss"] == v["val_curve"]["loss"][-1]
        assert v["loss_curve"]["loss"][-1] < v["loss_curve"]["loss"][0], f"{v['name']} train loss did not go down"
        assert v["val_loss"] < v["val_curve"]["loss"][0], f"{v['name']} val loss did not go down"
        assert v["steps"] == 10 and len(v["loss_curve"]["loss"]) == 10
        # The reported wire numbers are exactly wire_stats of the config that was trained.
        assert v["wire"] == wire_stats(RunConfig.from_wire_dict(v["config"]).model)
        assert math.isfinite(v["gap_vs_none_pct"])

    by = {(v["name"], v["optimizer"]): v for v in res["variants"]}
    # d=64, ratio 16 -> b=4: bf16 8 B, int8 4 B + 2 B scale, subspace adds a 1-byte token id; full width 128 B.
    assert by[("resbm-16x", "adamw")]["wire"]["wire_bytes_per_token_fwd"] == 8
    assert by[("resbm-16x", "adamw")]["wire"]["wire_bytes_per_token_bwd"] == 8
    assert by[("resbm-16x", "adamw")]["wire"]["compression_vs_bf16"] == 16
    assert by[("resbm-16x+int8", "adamw")]["wire"]["wire_bytes_per_token_fwd"] == 6
    assert by[("subspace-16x", "adamw")]["wire"]["wire_bytes_per_token_fwd"] == 9
    assert by[("none", "adamw")]["wire"]["wire_bytes_per_token_fwd"] == 128
    assert by[("int8", "adamw")]["wire"]["wire_bytes_per_token_fwd"] == 66
    assert by[("none", "muon")]["gap_vs_none_pct"] == 0

    # The table rows carry the same numbers as the per-variant records.
    rows = res["tables"]["main"]["rows"]
    for row, v in zip(rows, res["variants"]):
        assert row[:3] == [v["name"], v["optimizer"], v["val_loss"]]
        assert row[4] == [v["wire"]["wire_bytes_per_token_fwd"], v["wire"]["wire_bytes_per_token_bwd"]]

    assert [t["d_model"] for t in res["trend"]] == [64, 128]
    for t in res["trend"]:
        assert math.isfinite(t["gap_pct"]) and t["code_width"] == t["d_model"] // 16
    assert len(res["targets"]) == 2 and all(t["met"] in (True, False) for t in res["targets"])
    assert res["machine"]["torch"] and res["machine"]["cpu_count"] and "--quick" in res["command"]

    assert "| resbm-16x" in printed and "Target" in printed
    assert png_out.exists() and png_out.stat().st_size > 10_000 and png_out.read_bytes()[:4] == b"\x89PNG"


def test_plotting_helpers(tmp_path):
    from bench.plotting import markdown_table, smooth, write_json

    table = markdown_table(["name", "x"], [["a", 1], ["bb", 22]])
    assert table.splitlines() == ["| name |  x |", "| :--- | --: |", "| a    |  1 |", "| bb   | 22 |"]
    path = write_json(tmp_path / "sub" / "r.json", {"nan": float("nan"), "t": (1, 2)})
    assert json.loads(path.read_text()) == {"nan": None, "t": [1, 2]}
    assert smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
