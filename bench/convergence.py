"""Convergence benchmark: does ResBM at 128x compression train as well as an uncompressed pipeline?

Every variant trains the same staged model for the same tokens on the same data and seed with the
reference trainer (`swarm.local_trainer.LocalTrainer`, exactly the swarm's math, wire codec included):

    resbm-128x (AdamW, Muon), none (AdamW, Muon), bottleneck-128x, subspace-128x, int8 (full width),
    resbm-128x with the int8 wire codec

then a d-trend section (short runs of resbm-128x vs none at growing d: at small d, 128x leaves
only b = d/128 = 2..8 numbers per token). Prints markdown tables and whether the targets were met,
writes a JSON with every curve and number, and a PNG of the loss curves.

    python -m bench.convergence            # CPU size, ~20 min on 2 cores
    python -m bench.convergence --quick    # seconds (CI)
    python -m bench.convergence --scale    # GPU size (d=1024+, more layers, longer runs)
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import torch

from bench.convergence_swarm import render as render_swarm
from bench.convergence_swarm import swarm_row
from bench.plotting import fmt, line_plot, machine_info, markdown_table, smooth, write_json
from node.runtime import resolve_device
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.local_trainer import LocalTrainer, param_overhead, timed_steps, wire_stats

RESULTS = Path(__file__).parent / "results"

# model/train: ModelConfig/TrainConfig fields. trend: runs of resbm vs none (AdamW) at each d in
# dims, with n_heads = d/64; its model/train fields override the main ones.
PRESETS = {
    "default": {
        "model": dict(d_model=256, n_layers=4, n_heads=4, seq_len=128, n_stages=2, ratio=128),
        "train": dict(batch_size=16, microbatches=4, warmup_steps=20),
        "steps": 300, "eval_every": 50, "eval_batches": 32, "swarm_trainers": 2,
        "trend": {"dims": [256, 512, 1024], "model": dict(n_layers=2),
                  "train": dict(batch_size=8, microbatches=2, warmup_steps=10), "steps": 100, "eval_batches": 32},
    },
    "quick": {
        "model": dict(d_model=64, n_layers=2, n_heads=2, seq_len=32, n_stages=2, ratio=16),
        "train": dict(batch_size=4, microbatches=2, warmup_steps=2),
        "steps": 10, "eval_every": 5, "eval_batches": 4,
        "trend": {"dims": [64, 128], "model": dict(), "train": dict(), "steps": 5, "eval_batches": 4},
    },
    "scale": {
        "model": dict(d_model=1024, n_layers=8, n_heads=16, seq_len=512, n_stages=4, ratio=128),
        "train": dict(batch_size=32, microbatches=4, warmup_steps=100),
        "steps": 2000, "eval_every": 200, "eval_batches": 64, "swarm_trainers": 2,
        "trend": {"dims": [1024, 2048, 4096], "model": dict(n_layers=4, n_stages=2),
                  "train": dict(batch_size=16, microbatches=2, warmup_steps=50), "steps": 300, "eval_batches": 32},
    },
}

TARGET_GAP_PCT = 2.0
SWARM_GAP_PCT = 1.0  # the swarm row (issue 22): 2 replicas per stage averaging vs train-local, equal tokens


def variants(ratio: int) -> list[dict]:
    """The main comparison: (name, boundary, wire codec, optimizer)."""
    r = f"{ratio}x"
    rows = [(f"resbm-{r}", "resbm", "bf16", "adamw"), (f"resbm-{r}", "resbm", "bf16", "muon"),
            ("none", "none", "bf16", "adamw"), ("none", "none", "bf16", "muon"),
            (f"bottleneck-{r}", "bottleneck", "bf16", "adamw"), (f"subspace-{r}", "subspace", "bf16", "adamw"),
            ("int8", "int8", "int8", "adamw"), (f"resbm-{r}+int8", "resbm", "int8", "adamw")]
    return [dict(name=n, boundary=b, codec=c, optimizer=o) for n, b, c, o in rows]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_one(run: RunConfig, corpus: ByteCorpus, device: str, steps: int, eval_every: int,
              eval_batches: int, label: str) -> dict:
    """Train one config; validation (eval_batches fixed batches) at step 0, every eval_every, and at the end."""
    trainer = LocalTrainer(run, corpus, device=device)
    tokens_per_step = run.train.batch_size * run.model.seq_len
    val = {"step": [0], "tokens": [0], "loss": [trainer.evaluate(eval_batches)]}

    def on_step(tr, hist):
        if tr.step == steps or (eval_every and tr.step % eval_every == 0):
            val["step"].append(tr.step)
            val["tokens"].append(tr.step * tokens_per_step)
            val["loss"].append(tr.evaluate(eval_batches))
            recent = hist["step_time"][-eval_every:] if eval_every else hist["step_time"]
            log(f"  {label:<28} step {tr.step:>5}/{steps}  train {hist['loss'][-1]:.4f}  val {val['loss'][-1]:.4f}"
                f"  {sum(recent) / len(recent):.3f} s/step")

    t0 = time.perf_counter()
    hist = timed_steps(trainer, steps, on_step=on_step)
    wall = time.perf_counter() - t0
    times = hist["step_time"][1:] or hist["step_time"]  # the first step pays one-off warm-up costs
    return {
        "steps": steps, "tokens": steps * tokens_per_step, "tokens_per_step": tokens_per_step,
        "loss_curve": {"step": hist["step"], "tokens": [s * tokens_per_step for s in hist["step"]],
                       "loss": hist["loss"]},
        "val_curve": val, "val_loss": val["loss"][-1], "step_time_s": hist["step_time"],
        "mean_step_time_s": sum(times) / len(times), "wall_s": wall,
    }


def gap_pct(loss: float, ref: float) -> float:
    return 100.0 * (loss - ref) / ref


def run_main(preset: dict, corpus, device: str, steps: int, eval_every: int) -> list[dict]:
    base_model, base_train = preset["model"], preset["train"]
    results = []
    specs = variants(base_model["ratio"])
    for i, v in enumerate(specs):
        run = RunConfig(model=ModelConfig(**base_model, boundary=v["boundary"], codec=v["codec"]),
                        train=TrainConfig(**base_train, optimizer=v["optimizer"], steps=steps),
                        run_id="bench-convergence")
        label = f"{v['name']} ({v['optimizer']})"
        log(f"[{i + 1}/{len(specs)}] {label}")
        res = train_one(run, corpus, device, steps, eval_every, preset["eval_batches"], label)
        results.append({**v, "config": run.wire_dict(), "wire": wire_stats(run.model),
                        "param_overhead": param_overhead(run.model), **res})
    for r in results:
        ref = next((x for x in results if x["boundary"] == "none" and x["optimizer"] == r["optimizer"]), None)
        r["gap_vs_none_pct"] = gap_pct(r["val_loss"], ref["val_loss"]) if ref else None
    return results


def run_trend(preset: dict, corpus, device: str, steps: int) -> list[dict]:
    trend = preset["trend"]
    model_kw = {**preset["model"], **trend["model"]}
    train_kw = {**preset["train"], **trend["train"]}
    rows = []
    for d in trend["dims"]:
        row = {"d_model": d}
        for boundary in ("none", "resbm"):
            run = RunConfig(model=ModelConfig(**{**model_kw, "d_model": d, "n_heads": max(1, d // 64)},
                                              boundary=boundary),
                            train=TrainConfig(**train_kw, optimizer="adamw", steps=steps), run_id="bench-convergence")
            label = f"trend d={d} {boundary}"
            log(f"[trend] {label}")
            res = train_one(run, corpus, device, steps, 0, trend["eval_batches"], label)
            row[boundary] = {"config": run.wire_dict(), "wire": wire_stats(run.model),
                             "param_overhead": param_overhead(run.model), **res}
        row["code_width"] = row["resbm"]["wire"]["code_width"]
        row["n_layers"] = model_kw["n_layers"]
        row["steps"], row["tokens"] = steps, row["resbm"]["tokens"]
        row["gap_pct"] = gap_pct(row["resbm"]["val_loss"], row["none"]["val_loss"])
        rows.append(row)
    return rows


MAIN_HEADERS = ["variant", "optimizer", "val loss (nats/byte)", "gap vs none, same opt (%)",
                "wire B/token/boundary fwd + bwd", "compression vs bf16 full width (fwd)",
                "param overhead (%)", "mean step (s)"]
TREND_HEADERS = ["d", "b = d/ratio", "layers", "steps", "tokens", "val none", "val resbm", "gap (%)",
                 "resbm wire B/token fwd"]


def main_rows(results: list[dict]) -> list[list]:
    return [[r["name"], r["optimizer"], r["val_loss"], r["gap_vs_none_pct"],
             [r["wire"]["wire_bytes_per_token_fwd"], r["wire"]["wire_bytes_per_token_bwd"]],
             r["wire"]["compression_vs_bf16"], 100 * r["param_overhead"], r["mean_step_time_s"]] for r in results]


def trend_rows(trend: list[dict]) -> list[list]:
    return [[t["d_model"], t["code_width"], t["n_layers"], t["steps"], t["tokens"], t["none"]["val_loss"],
             t["resbm"]["val_loss"], t["gap_pct"], t["resbm"]["wire"]["wire_bytes_per_token_fwd"]] for t in trend]


def render_main(rows) -> str:
    return markdown_table(MAIN_HEADERS, [
        [n, o, fmt(v, ".4f"), fmt(g, "+.2f"), f"{w[0]} + {w[1]}", fmt(c, ".1f") + "x", fmt(p, ".2f"), fmt(s, ".3f")]
        for n, o, v, g, w, c, p, s in rows], align="llrrrrrr")


def render_trend(rows) -> str:
    return markdown_table(TREND_HEADERS, [
        [d, b, L, s, t, fmt(vn, ".4f"), fmt(vr, ".4f"), fmt(g, "+.2f"), w] for d, b, L, s, t, vn, vr, g, w in rows])


def targets(results: list[dict], ratio: int) -> list[dict]:
    """Evaluate the two targets from the measured numbers; `met` is None where a target could not be judged."""
    def find(boundary, optimizer="adamw", codec="bf16"):
        return next((r for r in results if r["boundary"] == boundary and r["optimizer"] == optimizer
                     and (boundary in ("none", "int8") or r["codec"] == codec)), None)

    def total_bytes(r):
        return r["wire"]["wire_bytes_per_token_fwd"] + r["wire"]["wire_bytes_per_token_bwd"]

    parts, met = [], []
    for opt in ("adamw", "muon"):
        r = find("resbm", opt)
        if r and r["gap_vs_none_pct"] is not None:
            ok = r["gap_vs_none_pct"] <= TARGET_GAP_PCT
            met.append(ok)
            parts.append(f"{opt}: {r['gap_vs_none_pct']:+.2f}% ({'met' if ok else 'missed'})")
    out = [{"target": f"ResBM-{ratio}x within {TARGET_GAP_PCT:g}% of none under the same optimizer",
            "met": all(met) if met else None, "detail": "; ".join(parts) or "not measured"}]

    parts, met = [], []
    resbm = find("resbm")
    for boundary in ("bottleneck", "subspace", "int8"):
        b = find(boundary)
        if not (resbm and b):
            continue
        if total_bytes(b) < total_bytes(resbm):
            parts.append(f"{b['name']}: uses fewer bytes ({total_bytes(b)} < {total_bytes(resbm)} B/token), not comparable")
            continue
        ok = resbm["val_loss"] < b["val_loss"]
        met.append(ok)
        parts.append(f"vs {b['name']} ({total_bytes(b)} B/token fwd+bwd vs {total_bytes(resbm)}): val "
                     f"{resbm['val_loss']:.4f} vs {b['val_loss']:.4f}, {gap_pct(resbm['val_loss'], b['val_loss']):+.2f}% "
                     f"({'met' if ok else 'missed'})")
    out.append({"target": f"ResBM-{ratio}x better than bottleneck/subspace/int8 at equal or larger wire bytes",
                "met": all(met) if met else None, "detail": "; ".join(parts) or "not measured"})
    return out


def render_targets(tgts: list[dict]) -> str:
    word = {True: "MET", False: "MISSED", None: "NOT JUDGED"}
    return "\n".join(f"- Target \"{t['target']}\": **{word[t['met']]}** — {t['detail']}" for t in tgts)


COLORS = {"resbm": "C0", "none": "C1", "bottleneck": "C2", "subspace": "C3", "int8": "C4"}


def plot(path, results: list[dict], trend: list[dict], title: str) -> None:
    def style(r):
        color = "C5" if r["boundary"] == "resbm" and r["codec"] == "int8" else COLORS[r["boundary"]]
        return {"color": color, "ls": "--" if r["optimizer"] == "muon" else "-"}

    def label(r):
        return f"{r['name']} ({r['optimizer']})"
    window = max(1, min(25, len(results[0]["loss_curve"]["loss"]) // 10))
    finals = [r["val_loss"] for r in results if r["val_loss"] == r["val_loss"]]
    top = max(v for r in results for v in r["val_curve"]["loss"][1:] if v == v) if finals else None
    ylim = (min(finals) - 0.05 * (top - min(finals) + 1e-9), top + 0.02) if finals and top else None
    panels = [
        {"title": "validation loss", "xlabel": "tokens", "ylabel": "nats/byte", "ylim": ylim,
         "series": [{"label": label(r), "x": r["val_curve"]["tokens"], "y": r["val_curve"]["loss"],
                     "style": {**style(r), "marker": "o", "ms": 3}} for r in results]},
        {"title": f"training loss (moving average, {window} steps)", "xlabel": "tokens", "ylabel": "nats/byte",
         "ylim": ylim,
         "series": [{"label": label(r), "x": r["loss_curve"]["tokens"], "y": smooth(r["loss_curve"]["loss"], window),
                     "style": style(r)} for r in results]},
    ]
    if trend:
        panels.append({"title": "d-trend: resbm vs none (AdamW)", "xlabel": "d_model", "ylabel": "val loss gap (%)",
                       "logx": True, "hline": TARGET_GAP_PCT, "xticks": [t["d_model"] for t in trend],
                       "xticklabels": [f"{t['d_model']}\nb={t['code_width']}" for t in trend],
                       "series": [{"label": "resbm gap vs none", "x": [t["d_model"] for t in trend],
                                   "y": [t["gap_pct"] for t in trend], "style": {"marker": "o", "color": "C0"}}]})
    line_plot(path, panels, title=title)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny CI-sized run (seconds)")
    size.add_argument("--scale", action="store_true", help="GPU-sized run (d >= 1024, more layers, longer)")
    p.add_argument("--steps", type=int, default=None, help="main runs' steps (overrides the preset)")
    p.add_argument("--trend-steps", type=int, default=None, help="d-trend runs' steps (0: skip the d-trend)")
    p.add_argument("--swarm-trainers", type=int, default=None,
                   help="the swarm row's trainers and replicas per stage (0: skip it; the preset's: 2, none in --quick)")
    p.add_argument("--only-swarm", action="store_true", help="run the swarm row and its reference only")
    p.add_argument("--eval-every", type=int, default=None, help="validation every N steps (overrides the preset)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:i] (default: cpu, auto for --scale)")
    p.add_argument("--data", default=None, help="text file or folder (default: Python stdlib sources)")
    p.add_argument("--json-out", default=str(RESULTS / "convergence.json"))
    p.add_argument("--png-out", default=str(RESULTS / "convergence.png"))
    return p.parse_args(argv)


def print_report(preset: dict, results: list[dict], trend: list[dict], main_md: str, trend_md: str, tgts: list[dict],
                 steps: int, trend_steps: int, where: str) -> None:
    m, tok, ratio = preset["model"], preset["train"], preset["model"]["ratio"]
    print(f"## Convergence: d={m['d_model']}, {m['n_layers']} layers, {m['n_stages']} stages, seq {m['seq_len']}, "
          f"batch {tok['batch_size']} ({tok['microbatches']} microbatches), {steps} steps = "
          f"{results[0]['tokens']} tokens per variant, byte-level ({where})\n")
    print("Val loss on a fixed set of " f"{preset['eval_batches']} validation microbatches. Wire bytes per token per "
          "boundary; compression = bf16 at full width d (2d bytes) / forward bytes.\n")
    print(main_md + "\n")
    if trend:
        tr = trend[0]["resbm"]["config"]
        print(f"## d-trend: resbm-{ratio}x vs none (AdamW), {trend[0]['n_layers']} layers, {tr['model.n_stages']} "
              f"stages, seq {tr['model.seq_len']}, batch {tr['train.batch_size']}, {trend_steps} steps, "
              f"n_heads = d/64\n")
        print(trend_md + "\n")
    print(render_targets(tgts))


def main(argv=None) -> int:
    args = parse_args(argv)
    name = "quick" if args.quick else "scale" if args.scale else "default"
    preset = copy.deepcopy(PRESETS[name])
    device = resolve_device(args.device or ("auto" if args.scale else "cpu"))
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls; recorded in the JSON
    steps = args.steps if args.steps is not None else preset["steps"]
    eval_every = args.eval_every if args.eval_every is not None else preset["eval_every"]
    trend_steps = args.trend_steps if args.trend_steps is not None else preset["trend"]["steps"]
    if steps < 1:
        raise SystemExit("error: --steps must be >= 1")

    t0 = time.perf_counter()
    command = shlex.join([sys.executable, "-m", "bench.convergence", *(sys.argv[1:] if argv is None else argv)])
    corpus = ByteCorpus(args.data)
    ratio = preset["model"]["ratio"]
    log(f"bench.convergence ({name}): {len(variants(ratio))} variants x {steps} steps, d-trend "
        f"{preset['trend']['dims'] if trend_steps else 'skipped'} x {trend_steps} steps, device {device}, "
        f"data {corpus.name}")
    swarm_trainers = args.swarm_trainers if args.swarm_trainers is not None else preset.get("swarm_trainers", 0)
    swarm = swarm_row(preset, corpus, str(device), steps, eval_every, swarm_trainers, train_one) \
        if swarm_trainers else None
    if swarm is not None:
        print("## The swarm against train-local (equal tokens)\n\n" + render_swarm(swarm, SWARM_GAP_PCT) + "\n")
    if args.only_swarm:
        # its own file: the main results stay as the last full run left them
        write_json(Path(args.json_out).with_name("convergence_swarm.json"),
                   {"benchmark": "convergence", "preset": name, "swarm": swarm, "steps": steps,
                    "machine": machine_info(device), "data": corpus.name, "command": command})
        return 0
    results = run_main(preset, corpus, str(device), steps, eval_every)
    trend = run_trend(preset, corpus, str(device), trend_steps) if trend_steps else []
    wall = time.perf_counter() - t0

    main_md = render_main(main_rows(results))
    trend_md = render_trend(trend_rows(trend)) if trend else ""
    tgts = targets(results, ratio)
    print_report(preset, results, trend, main_md, trend_md, tgts, steps, trend_steps, f"{corpus.name}, device {device}")
    print(f"\nwall time {wall:.0f} s")

    plot(args.png_out, results, trend, f"bench.convergence ({name}): d={preset['model']['d_model']}, ratio {ratio}, "
                                        f"{steps} steps")
    write_json(args.json_out, {
        "benchmark": "convergence", "preset": name, "command": command,
        "machine": {**machine_info(device), "float32_matmul_precision": torch.get_float32_matmul_precision()},
        "data": corpus.name, "settings": {**preset, "steps": steps, "eval_every": eval_every, "trend_steps": trend_steps},
        "wall_time_s": wall, "variants": results, "trend": trend, "swarm": swarm,
        "tables": {"main": {"headers": MAIN_HEADERS, "rows": main_rows(results), "markdown": main_md},
                   "trend": {"headers": TREND_HEADERS, "rows": trend_rows(trend), "markdown": trend_md}},
        "targets": tgts,
    })
    log(f"wrote {args.json_out} and {args.png_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
