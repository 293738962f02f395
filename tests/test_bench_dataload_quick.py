"""bench.dataload --quick: the loader's rates against the trainer's, written as JSON and PNG."""
import json

from bench import dataload


def test_dataload_quick_writes_its_table_and_the_loader_outruns_the_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("RESBM_DATA_CACHE", str(tmp_path / "cache"))
    assert dataload.main(["--quick", "--json-out", str(tmp_path / "d.json"), "--png-out", str(tmp_path / "d.png")]) == 0
    result = json.loads((tmp_path / "d.json").read_text())
    rows = {r["tokenizer"]: r for r in result["rows"]}
    assert set(rows) == {"bytes", "BPE 1024"} and (tmp_path / "d.png").stat().st_size > 10_000
    assert rows["BPE 1024"]["bytes_per_token"] > 2 and rows["bytes"]["bytes_per_token"] == 1
    for r in rows.values():
        assert r["draw_tokens_per_s"] > r["trainer_tokens_per_s"] and r["tokenize_tokens_per_s"] > r["trainer_tokens_per_s"]
        assert len(r["loss_curve"]) == 6 and r["val_loss"] > 0
