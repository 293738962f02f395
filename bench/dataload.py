"""Is the data loader ever the bottleneck? Tokens/s of the loader on one core against what a trainer consumes.

For each tokenizer (bytes, and a BPE trained here on the same text) it measures, on ONE core:
  tokenize   building the token cache (read the source, tokenize, write): paid once per corpus and machine
  draw       `corpus.batch` from the memory-mapped cache: paid on every microbatch
and, on --device, the tokens/s a single-process trainer (train-local's LocalTrainer: every stage in one
process, so an upper bound for one swarm trainer) consumes with that vocabulary. Headroom = loader / trainer.
The trainer trains the same model for the preset's steps on each tokenization; its validation loss is
also given in bits per byte of text, the unit in which a byte-level and a BPE run compare.

    python -m bench.dataload --quick          # seconds (CI-sized)
    python -m bench.dataload                  # the stdlib (~30 MB), BPE 4096, the default model
    python -m bench.dataload --scale --device cuda   # bigger model on a GPU, the whole stdlib
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {
    "quick": {"max_bytes": 2 << 20, "bpe_vocab": 1024, "steps": 6, "draws": 200,
              "model": dict(d_model=128, n_layers=2, n_heads=4, seq_len=128, n_stages=2, ratio=16),
              "train": dict(batch_size=8, microbatches=2)},
    "default": {"max_bytes": 0, "bpe_vocab": 4096, "steps": 100, "draws": 1000,
                "model": dict(), "train": dict()},
    "scale": {"max_bytes": 0, "bpe_vocab": 32768, "steps": 300, "draws": 1000,
              "model": dict(d_model=1024, n_layers=8, n_heads=16, kv_heads=4, seq_len=512, n_stages=4, ratio=128),
              "train": dict(batch_size=32, microbatches=4)},
}


def log(msg: str) -> None:
    print(msg, flush=True)


def train_bpe(source: str, vocab: int, sample_bytes: int, path: Path) -> Path:
    """A byte-level BPE trained on the first `sample_bytes` of the source (what an operator would do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from swarm.sources import documents
    texts, size = [], 0
    for _, text, _ in documents(source, "text"):
        texts.append(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)
        size += len(texts[-1])
        if size >= sample_bytes:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path))
    return path


def loader_rates(source: str, tokenizer: str, max_bytes: int, draws: int, seq_len: int, cache: Path) -> dict:
    """Cache build (tokenize) and batch draw rates of one corpus, on the current (single) thread."""
    from swarm.data import Corpus
    t0 = time.perf_counter()
    corpus = Corpus(source, tokenizer=tokenizer, max_bytes=max_bytes, cache_dir=cache)
    build_s = time.perf_counter() - t0
    tokens = corpus.tokens("train") + corpus.tokens("val")
    t0 = time.perf_counter()
    for i in range(draws):
        corpus.batch("train", 8, seq_len, seed=0, step=i, micro=i % 4)
    draw_s = time.perf_counter() - t0
    return {"tokenizer": corpus.tokenizer.name, "vocab": corpus.vocab_size, "tokens": tokens,
            "bytes": corpus.meta["bytes_read"], "bytes_per_token": corpus.meta["bytes_read"] / tokens,
            "tokenize_s": build_s, "tokenize_tokens_per_s": tokens / build_s,
            "tokenize_mb_per_s": corpus.meta["bytes_read"] / build_s / 1e6,
            "draw_tokens_per_s": draws * 8 * seq_len / draw_s, "corpus": corpus}


def train(corpus, preset: dict, device: str, threads: int) -> dict:
    """Tokens/s a single-process trainer consumes with this corpus's vocabulary (after one warm-up step),
    its loss curve and its final validation loss."""
    import torch
    from bench.plotting import steady_tokens_per_s
    from swarm.config import ModelConfig, RunConfig, TrainConfig
    from swarm.local_trainer import LocalTrainer
    torch.set_num_threads(threads)
    run = RunConfig(model=ModelConfig(vocab_size=corpus.vocab_size, **preset["model"]),
                    train=TrainConfig(**preset["train"]))
    trainer = LocalTrainer(run, corpus, device=device)
    times, losses = [], []
    for _ in range(preset["steps"]):
        t0 = time.perf_counter()
        losses.append(trainer.train_step())
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens_per_step = run.train.batch_size * run.model.seq_len
    return {"trainer_tokens_per_s": steady_tokens_per_s(times, 1, tokens_per_step), "trainer_threads": threads,
            "steps": len(losses), "loss_curve": losses, "val_loss": trainer.evaluate(),
            "model": {k: v for k, v in run.wire_dict().items() if k.startswith("model.")}}


def render(rows: list[dict]) -> str:
    from bench.plotting import fmt, markdown_table
    return markdown_table(
        ["tokenizer", "vocab", "tokens", "bytes/token", "tokenize tok/s (1 core)", "tokenize MB/s",
         "draw tok/s (1 core)", "trainer consumes tok/s", "headroom tokenize", "headroom draw",
         "val loss (nats/token)", "val bits/byte"],
        [[r["tokenizer"], r["vocab"], r["tokens"], fmt(r["bytes_per_token"], ".2f"), fmt(r["tokenize_tokens_per_s"], ".3g"),
          fmt(r["tokenize_mb_per_s"], ".3g"), fmt(r["draw_tokens_per_s"], ".3g"), fmt(r["trainer_tokens_per_s"], ".3g"),
          fmt(r["tokenize_tokens_per_s"] / r["trainer_tokens_per_s"], ".1f") + "x",
          fmt(r["draw_tokens_per_s"] / r["trainer_tokens_per_s"], ".0f") + "x", fmt(r["val_loss"], ".3f"),
          fmt(r["val_bits_per_byte"], ".3f")] for r in rows])


def plot(rows: list[dict], path: Path, title: str) -> None:
    from bench.plotting import line_plot
    x = list(range(len(rows)))
    series = [{"label": label, "x": x, "y": [r[key] for r in rows], "style": {"marker": "o", "ls": ""}}
              for label, key in (("tokenize (1 core)", "tokenize_tokens_per_s"), ("draw (1 core)", "draw_tokens_per_s"),
                                 ("trainer consumes", "trainer_tokens_per_s"))]
    curves = [{"label": r["tokenizer"], "x": list(range(1, r["steps"] + 1)),
               "y": [loss / math.log(2) / r["bytes_per_token"] for loss in r["loss_curve"]]} for r in rows]
    line_plot(path, [{"title": "tokens/s", "xlabel": "tokenizer", "ylabel": "tokens/s", "logy": True,
                      "xticks": x, "xticklabels": [f"{r['tokenizer']}\n(vocab {r['vocab']})" for r in rows],
                      "series": series},
                     {"title": "training loss, same model", "xlabel": "step", "ylabel": "bits per byte of text",
                      "series": curves}], title=title)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.dataload", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 MiB of text, tiny model (seconds)")
    size.add_argument("--scale", action="store_true", help="bigger hardware: a d=1024 GQA model, BPE 32k")
    p.add_argument("--data", default="stdlib", help="source to measure (any --data of a run; default: stdlib)")
    p.add_argument("--device", default="cpu", help="where the trainer runs: cpu | cuda[:i] | auto")
    p.add_argument("--trainer-threads", type=int, default=0, help="torch threads of the trainer (0: all cores)")
    p.add_argument("--json-out", default=str(RESULTS / "dataload.json"))
    p.add_argument("--png-out", default=str(RESULTS / "dataload.png"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    name = "quick" if args.quick else "scale" if args.scale else "default"
    preset = PRESETS[name]
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the loader on one core: tokenizers' batches in one thread
    os.environ["RAYON_NUM_THREADS"] = "1"
    import torch
    from bench.plotting import machine_info, write_json
    from node.runtime import resolve_device
    device = resolve_device(args.device)
    threads = args.trainer_threads or os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="dataload-") as tmp:
        bpe = train_bpe(args.data, preset["bpe_vocab"], 2 << 20, Path(tmp) / "bpe.json")
        for tokenizer in ("bytes", str(bpe)):
            torch.set_num_threads(1)
            row = loader_rates(args.data, tokenizer, preset["max_bytes"], preset["draws"],
                               preset["model"].get("seq_len", 128), Path(tmp) / "cache")
            row.update(train(row.pop("corpus"), preset, str(device), threads))
            row["val_bits_per_byte"] = row["val_loss"] / math.log(2) / row["bytes_per_token"]
            row["tokenizer"] = "bytes" if tokenizer == "bytes" else f"BPE {preset['bpe_vocab']}"
            log(f"{row['tokenizer']}: tokenize {row['tokenize_tokens_per_s']:.3g} tok/s, draw "
                f"{row['draw_tokens_per_s']:.3g} tok/s, trainer {row['trainer_tokens_per_s']:.3g} tok/s")
            rows.append(row)
    table = render(rows)
    title = f"data loader vs trainer ({name}, data {args.data}, trainer on {device})"
    print(f"\n## {title}\n\n{table}\n")
    write_json(args.json_out, {"bench": "dataload", "preset": name, "data": args.data, "rows": rows,
                               "machine": machine_info(device), "table": table})
    plot(rows, Path(args.png_out), title)
    print(f"wrote {args.json_out} and {args.png_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
