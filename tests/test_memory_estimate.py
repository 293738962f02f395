"""The start-up memory estimate (swarm/memory.py) against what a stage really holds: the activations it
counts per token against the bytes autograd saves, and the whole estimate against the peak RSS of a
child process that serves a stage as the stage server does (a middle stage: M + 1 forwards held, then
their backwards, steps included, with and without activation checkpointing; the last stage: loss steps)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.memory import graph_bytes_per_token, stage_memory_bytes
from swarm.model import build_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Activations dominate (~150 MB) so the measurement is well above the allocator's noise (~10 MB).
MEASURED = dict(d_model=128, n_layers=6, n_heads=4, seq_len=256, n_stages=3, ratio=16)
MICROBATCH, M = 4, 4
TOLERANCE = (0.85, 1.2)  # measured / estimated peak


def saved_bytes(stage, x, tokens) -> int:
    """Bytes of the distinct storages autograd saves in the stage's forward, weights and buffers aside."""
    own = {t.untyped_storage().data_ptr() for t in [*stage.parameters(), *stage.buffers()]}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stage(x, tokens)
    return sum(seen.values())


@pytest.mark.parametrize("boundary,kv_heads", [("resbm", 0), ("resbm", 2), ("bottleneck", 0), ("none", 2)])
def test_activations_counted_per_token_are_what_autograd_saves(boundary, kv_heads):
    cfg = ModelConfig(d_model=64, n_layers=3, n_heads=4, kv_heads=kv_heads, seq_len=32, n_stages=3, ratio=16,
                      boundary=boundary)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    for k in range(cfg.n_stages):
        x = tokens if k == 0 else torch.randn(2, cfg.seq_len, cfg.code_width, requires_grad=True)
        saved = saved_bytes(build_stage(cfg, k), x, tokens) / tokens.numel()
        assert saved == pytest.approx(graph_bytes_per_token(cfg, k, 4, False), rel=0.01), (boundary, k)


def _run(**model) -> RunConfig:
    return RunConfig(model=ModelConfig(**model), train=TrainConfig(batch_size=MICROBATCH * M, microbatches=M,
                                                                   optimizer="muon"))


def measure(index: int, checkpointing: bool) -> dict:
    """In a fresh process: peak RSS above the RSS before the stage existed. A middle stage takes one
    step (optimizer state), then holds M + 1 forwards at once (the oldest graph is dropped, then
    recomputed) and runs their backwards; the last stage runs 2 M loss steps (forward, loss and
    backward in one call)."""
    from swarm.stage_worker import StageWorker
    torch.manual_seed(0)
    small = _run(d_model=32, n_layers=3, n_heads=2, seq_len=8, n_stages=3, ratio=8)
    _serve(StageWorker(small, index, activation_checkpointing=checkpointing))  # torch loads its kernels (~80 MB) once
    before = _rss("VmRSS")
    w = StageWorker(_run(**MEASURED), index, activation_checkpointing=checkpointing)
    _serve(w)
    return {"peak_bytes": _rss("VmHWM") - before, "recomputed": w.recomputed, "steps": w.applied_step + 1}


def _serve(w) -> None:
    """Two steps' worth of microbatches, as the stage server feeds them."""
    shape = (MICROBATCH, w.run.model.seq_len, w.run.model.code_width)
    if w.stage.is_last:
        for _ in range(2 * M):
            tokens = torch.randint(0, w.run.model.vocab_size, shape[:2])
            w.loss_step(torch.randn(shape), tokens, tokens)
        return
    for n in (M, M + 1):  # n forwards held at once, then their backwards (a step every M)
        handles = [w.begin(torch.randn(shape))[0] for _ in range(n)]
        for h in handles:
            w.finish(h, torch.randn(shape))


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _measure_in_child(index: int, checkpointing: bool) -> dict:
    # Large blocks through mmap at a fixed threshold: freed tensors leave the RSS at once.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, json.dumps([index, checkpointing])], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_estimate_matches_measured_peak_with_and_without_activation_checkpointing():
    run = _run(**MEASURED)
    rows = {}
    for index, ckpt in ((1, False), (1, True), (2, False)):
        got = _measure_in_child(index, ckpt)
        want = stage_memory_bytes(run, index, build_stage(run.model, index), None, ckpt)["total_bytes"]
        rows[index, ckpt] = (got["peak_bytes"], want)
        assert got["steps"] == 2 and got["recomputed"] >= (index == 1)  # a middle stage's M+1-th graph was dropped
    print({f"stage {i} ckpt={c}": f"measured {g / 2**20:.1f} MiB, estimated {w / 2**20:.1f} MiB"
           for (i, c), (g, w) in rows.items()})
    for key, (got, want) in rows.items():
        assert TOLERANCE[0] <= got / want <= TOLERANCE[1], (key, got, want)
    assert rows[1, True][0] < 0.4 * rows[1, False][0]  # checkpointing keeps only each block's input


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(measure(*json.loads(sys.argv[1]))))
