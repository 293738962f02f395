"""Real data: .jsonl/.parquet/text sources, a BPE tokenizer trained here, the memory-mapped token cache,
deterministic batches, the fingerprint and the refusal of a node whose data or tokenizer is not the run's,
and a train-local run on parquet + BPE whose loss falls. Local files only (a stand-in `datasets` module
for hf:)."""
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from node.args import parse_run_config
from protocol.fingerprint import describe_diff
from swarm import token_cache
from swarm.config import ConfigError, DataConfig, RunConfig
from swarm.data import Corpus, open_corpus

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 1000


def _paragraphs(limit: int = 600_000) -> list[str]:
    """Real English and code from this Python's standard library, in paragraphs of 20 lines."""
    lines = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        lines += path.read_text(errors="replace").splitlines()
        if sum(map(len, lines)) > limit:
            break
    return ["\n".join(lines[i:i + 20]) for i in range(0, len(lines), 20)]


def _train_bpe(texts: list[str], vocab: int, path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    texts = _paragraphs()
    (root / "docs.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), root / "docs.parquet",
                   row_group_size=256)
    return types.SimpleNamespace(root=root, texts=texts, jsonl=root / "docs.jsonl", parquet=root / "docs.parquet",
                                 bpe=_train_bpe(texts, VOCAB, root / "bpe.json"), cache=root / "cache")


@pytest.fixture(autouse=True)
def _cache(files, monkeypatch):
    monkeypatch.setenv("RESBM_DATA_CACHE", str(files.cache))


def test_jsonl_and_parquet_are_read_by_column_and_tokenized_with_bpe(files):
    a, b = Corpus(str(files.jsonl), tokenizer=str(files.bpe)), Corpus(str(files.parquet), tokenizer=str(files.bpe))
    assert a.vocab_size == b.vocab_size == VOCAB and a.splits["train"].dtype == np.uint16
    eos = a.tokenizer.eos
    for c in (a, b):  # every row is one document, closed by <|endoftext|>; ~5% of them are validation
        ends = sum(int((c.splits[s] == eos).sum()) for s in ("train", "val"))
        assert ends == len(files.texts) and 0 < c.meta["tokens"]["val"] < 0.15 * c.meta["tokens"]["train"]
    assert a.tokens("train") + a.tokens("val") == b.tokens("train") + b.tokens("val")
    # BPE really compresses: about 3+ characters per token on this text
    assert sum(map(len, files.texts)) / (a.tokens("train") + a.tokens("val")) > 2.5


def test_batches_are_a_pure_function_of_seed_split_step_micro(files):
    c = Corpus(str(files.parquet), tokenizer=str(files.bpe))
    x, y = c.batch("train", 4, 32, seed=1, step=7, micro=3)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < VOCAB
    again = Corpus(str(files.parquet), tokenizer=str(files.bpe))  # reopened from the cache
    assert torch.equal(again.batch("train", 4, 32, seed=1, step=7, micro=3)[0], x)
    assert not torch.equal(c.batch("train", 4, 32, seed=1, step=7, micro=4)[0], x)
    assert c.batch("train", 2, 32, seed=1, step=7, micro=10_000)[0].shape == (2, 32)  # any micro: a trainer's own
    assert c.batch("val", 2, 32, seed=1, step=0)[0].shape == (2, 32)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        c.batch("val", 1, 10 ** 7, seed=1, step=0)


def test_a_large_folder_is_streamed_into_a_memory_mapped_cache(files, tmp_path, monkeypatch, caplog):
    folder = tmp_path / "big"
    folder.mkdir()
    line = b"the quick brown fox jumps over the lazy dog 0123456789\n"
    (folder / "a.txt").write_bytes(line * ((12 << 20) // len(line)))  # 12 MiB
    (folder / "b.md").write_bytes(line * 1000)
    tracemalloc.start()
    c = Corpus(str(folder), cache_dir=tmp_path / "cache")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert c.tokens("train") + c.tokens("val") == (12 << 20) // len(line) * len(line) + 1000 * len(line)
    assert peak < 8 << 20, f"building held {peak >> 20} MiB: the corpus is not streamed"
    assert all(isinstance(s, np.memmap) for s in c.splits.values()) and c.meta["documents"] >= 12
    monkeypatch.setattr(token_cache, "build", lambda *a, **k: pytest.fail("rebuilt a cache that exists"))
    Corpus(str(folder), cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="resbm.data"):
        capped = Corpus(str(folder), max_bytes=3 << 20, cache_dir=tmp_path / "cache")
    assert capped.meta["capped"] and capped.meta["bytes_read"] == 3 << 20
    assert "only its first 3145728 bytes" in caplog.text


def test_a_single_small_file_keeps_its_last_5_percent_for_validation(tmp_path):
    f = tmp_path / "one.txt"
    f.write_bytes(bytes(range(32, 127)) * 100)
    c = Corpus(str(f), cache_dir=tmp_path / "cache")
    assert (c.tokens("train"), c.tokens("val")) == (9025, 475)
    assert bytes(c.splits["val"][:5]) == f.read_bytes()[9025:9030]


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "missing", ["neither a file nor a folder"]),
    (lambda d: _write(d / "x.jsonl", '{"body": "hi"}\n'), ["x.jsonl:1", "'text'", "['body']", "--data-column"]),
    (lambda d: _write(d / "x.jsonl", "not json\n"), ["x.jsonl:1", "not a JSON line"]),
    (lambda d: _parquet(d / "x.parquet", body=["hi"]), ["x.parquet", "no column 'text'", "--data-column"]),
    (lambda d: _write(d / "empty" / "notes.bin", "x").parent, ["no data files"]),
])
def test_bad_data_is_refused_by_name(tmp_path, make, words):
    with pytest.raises(ConfigError) as e:
        Corpus(str(make(tmp_path)), cache_dir=tmp_path / "cache")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_tokenizers_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="not 'bytes', 'hf:<name>' or an existing"):
        Corpus("stdlib", tokenizer=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="not a tokenizers JSON file"):
        Corpus("stdlib", tokenizer=str(_write(tmp_path / "t.json", '{"hello": 1}')))


def test_the_run_fingerprint_holds_data_and_tokenizer_and_a_node_with_others_is_refused(files, tmp_path):
    byte_run = parse_run_config([])
    assert byte_run.data.data.startswith("stdlib:") and byte_run.data.data_hash  # the Python version is in it
    run = parse_run_config(["--data", str(files.parquet), "--tokenizer", str(files.bpe)])
    assert run.model.vocab_size == VOCAB and run.data.tokenizer_hash not in ("", "bytes")
    diff = " ".join(describe_diff(byte_run.wire_dict(), run.wire_dict()))
    for key in ("data.data", "data.tokenizer", "data.data_hash", "data.tokenizer_hash", "model.vocab_size"):
        assert key in diff
    back = RunConfig.from_wire_dict(run.wire_dict())  # as a joiner reads it from the DHT
    assert back.data == run.data and back.fingerprint == run.fingerprint

    copy = Path(shutil.copy(files.parquet, tmp_path / "elsewhere.parquet"))  # same file at another path: fine
    assert open_corpus(run, data=str(copy)).vocab_size == VOCAB
    pq.write_table(pa.table({"text": files.texts[:-1]}), copy)  # one row less: other data
    with pytest.raises(ConfigError, match=r"data: the run's is .*docs\.parquet .*other files or sizes"):
        open_corpus(run, data=str(copy))
    other = _train_bpe(files.texts[:200], 600, tmp_path / "other.json")
    with pytest.raises(ConfigError, match=r"tokenizer: the run's is .*bpe\.json"):
        open_corpus(run, tokenizer=str(other))
    old_python = RunConfig(data=DataConfig(data="stdlib:2.7"))
    with pytest.raises(ConfigError, match="standard library of Python 2.7"):
        open_corpus(old_python)


def test_the_vocabulary_follows_the_tokenizer_and_a_smaller_one_is_refused(files):
    assert parse_run_config(["--tokenizer", str(files.bpe), "--vocab-size", "1024"]).model.vocab_size == 1024
    with pytest.raises(SystemExit, match=r"vocab_size=300 is smaller than the 1000 tokens"):
        parse_run_config(["--tokenizer", str(files.bpe), "--vocab-size", "300"])


def test_every_data_flag_reaches_the_run_config(files):
    run = parse_run_config(["--data", str(files.jsonl), "--data-column", "text", "--data-max-bytes", "4096",
                            "--tokenizer", str(files.bpe)])
    d = run.data
    assert (d.data, d.data_column, d.data_max_bytes, d.tokenizer) == (str(files.jsonl), "text", 4096, str(files.bpe))
    with pytest.raises(SystemExit, match="data_max_bytes must be >= 0"):
        parse_run_config(["--data-max-bytes", "-1"])


def test_hf_datasets_are_streamed_with_their_validation_split(tmp_path, monkeypatch):
    calls = []
    rows = {"train": [{"text": f"train row {i}\n"} for i in range(50)],
            "validation": [{"text": f"held out {i}\n"} for i in range(5)]}

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter(rows[split])
    fake = types.SimpleNamespace(load_dataset=load_dataset, get_dataset_split_names=lambda name, config: list(rows))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    c = Corpus("hf:someone/corpus:en", cache_dir=tmp_path)
    assert calls == [("someone/corpus", "en", s, True) for s in ("train", "validation")]
    assert bytes(c.splits["val"]) == "".join(r["text"] for r in rows["validation"]).encode()
    assert c.data_hash == Corpus("hf:someone/corpus:en", cache_dir=tmp_path).data_hash
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ConfigError, match=r"needs the Hugging Face `datasets` package"):
        Corpus("hf:another", cache_dir=tmp_path)


def test_train_local_on_parquet_with_bpe_lowers_the_loss(files, tmp_path):
    out = tmp_path / "s.json"
    res = subprocess.run([sys.executable, "-m", "node.cli", "train-local", "--data", str(files.parquet),
                          "--tokenizer", str(files.bpe), "--d-model", "64", "--layers", "2", "--heads", "4",
                          "--kv-heads", "2", "--stages", "2", "--ratio", "16", "--seq-len", "64", "--batch-size", "8",
                          "--microbatches", "2", "--steps", "40", "--warmup", "5", "--lr", "1e-2",
                          "--lr-schedule", "cosine", "--eval-every", "0", "--checkpoint", "", "--json-out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, RESBM_DATA_CACHE=str(files.cache)))
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["config"]["model.vocab_size"] == VOCAB and s["config"]["data.tokenizer_hash"]
    assert s["config"]["train.decay_steps"] == 40
    # from ln(1000) = 6.9 (uniform) towards the text's token statistics in 40 steps of 512 tokens
    assert s["train_loss_first"] > 6.5 and s["train_loss_last10"] < s["train_loss_first"] - 0.6, s["loss_curve"]
    assert s["val_loss"] < s["train_loss_first"] - 0.6


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _parquet(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_generate_speaks_the_runs_tokenizer_and_checks_it(files, tmp_path):
    """A model trained with a BPE is sampled in BPE ids and decoded to text (not read as bytes); a
    tokenizer whose content differs from the run's is refused."""
    from swarm.export import save_export
    from swarm.model import StagedModel
    run = parse_run_config(["--data", str(files.parquet), "--tokenizer", str(files.bpe), "--d-model", "32",
                            "--layers", "2", "--heads", "2", "--stages", "2", "--ratio", "8", "--seq-len", "16"])
    model = StagedModel(run.model)
    save_export(str(tmp_path / "m.st"), run, {k: s.state_dict() for k, s in enumerate(model.stages)}, {0: 0, 1: 0})
    gen = lambda *extra: subprocess.run([sys.executable, "-m", "node.cli", "generate", "--model", str(tmp_path / "m.st"),  # noqa: E731
                                         "--prompt", "the ", "--tokens", "8", "--device", "cpu", *extra],
                                        cwd=ROOT, capture_output=True, text=True, timeout=120)
    res = gen()
    assert res.returncode == 0 and res.stdout.startswith("the "), res.stderr[-2000:]
    # 8 ids of a 1000-token BPE (mostly merges of several characters) decode to far more than 8 characters
    # (seeded sampling of a seeded model: the same text every run); read as bytes they would give at most 8
    assert len(res.stdout) - len("the ") - 1 > 12, res.stdout
    other = _train_bpe(files.texts[:200], 600, tmp_path / "other.json")
    res = gen("--tokenizer", str(other))
    assert res.returncode != 0 and "the run was trained with" in res.stderr, res.stderr[-2000:]


def test_a_local_swarm_trains_on_parquet_with_bpe_and_sends_u16_ids(files, tmp_path):
    """The whole swarm, not one process: `resbm-node local` on the parquet set with the BPE, its loss
    falls, and the targets cross every hop as u16 (a 1000-token vocabulary), 2 bytes per token."""
    out = tmp_path / "s.json"
    res = subprocess.run([sys.executable, "-m", "node.cli", "local", "--data", str(files.parquet),
                          "--tokenizer", str(files.bpe), "--d-model", "64", "--layers", "2", "--heads", "4",
                          "--kv-heads", "2", "--stages", "2", "--ratio", "16", "--seq-len", "64", "--batch-size", "8",
                          "--microbatches", "2", "--steps", "30", "--warmup", "5", "--lr", "1e-2", "--eval-every",
                          "0", "--run-dir", str(tmp_path / "run"), "--json-out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, RESBM_DATA_CACHE=str(files.cache)))
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["steps_completed"] == 30 and s["config"]["model.vocab_size"] == VOCAB
    curve = s["loss_curve"]
    assert sum(curve[-5:]) / 5 < curve[0] - 0.5, curve
    code = 2 * (64 // 16)  # b = 4 values per token in bf16
    assert s["measured_code_bytes_per_token_fwd"] == pytest.approx(code + 2)  # the code and u16 targets
    assert s["measured_code_bytes_per_token_bwd"] == code
