"""The single-process reference trainer: the whole staged model, with exactly the swarm's math.

Per optimizer step: `microbatches` microbatches, each loss scaled by 1/microbatches, the wire
codec applied to codes (forward) and their gradients (backward) at every boundary, then every stage
clips and steps its own optimizer. The swarm does the same across processes.
"""
from __future__ import annotations

import time

import torch

from protocol.codec import bytes_per_token, int_codec_for, INT_CODECS
from swarm.checkpoint import atomic_save, load
from swarm.config import ModelConfig, RunConfig
from swarm.data import ByteCorpus
from swarm.model import StagedModel, count_parameters, lm_loss
from swarm.optim import StageOptimizer
from swarm.precision import LossScaler, autocast, device_autocast_dtype


def token_id_bytes(cfg: ModelConfig) -> int:
    return INT_CODECS[int_codec_for(cfg.vocab_size)][0]().itemsize


def wire_stats(cfg: ModelConfig, tokens: int | None = None) -> dict:
    """Bytes per token crossing ONE boundary, forward (code, plus token ids where the boundary needs
    them) and backward (the code's gradient), and the ratio against bf16 at full width d.

    `tokens` is the number of tokens in one message (a microbatch): per-channel codecs share their
    scales across them. Default: one sequence (seq_len tokens), the smallest message, so the
    figure never understates the scales' cost."""
    tokens = tokens or cfg.seq_len
    code_fwd = bytes_per_token(cfg.wire_codec, cfg.code_width, tokens)
    code_bwd = bytes_per_token(cfg.wire_codec_bwd, cfg.code_width, tokens)
    fwd = code_fwd + (token_id_bytes(cfg) if cfg.boundary == "subspace" else 0)
    return {
        "code_width": cfg.code_width,
        "wire_codec": cfg.wire_codec,
        "wire_codec_bwd": cfg.wire_codec_bwd,
        "tokens_per_message": tokens,
        "wire_bytes_per_token_fwd": fwd,
        "wire_bytes_per_token_bwd": code_bwd,
        "full_width_bf16_bytes_per_token": 2 * cfg.d_model,
        "compression_vs_bf16": (2 * cfg.d_model) / fwd,
    }


def param_overhead(cfg: ModelConfig) -> float:
    """Boundary parameters as a fraction of the same model's parameters without them."""
    model = StagedModel(cfg)
    extra = sum(s.boundary_parameters() for s in model.stages)
    return extra / (count_parameters(model) - extra)


class LocalTrainer:
    def __init__(self, run: RunConfig, corpus: ByteCorpus, device: str = "cpu", precision: str = "auto",
                 activation_checkpointing: bool = False):
        self.run, self.corpus, self.device = run, corpus, torch.device(device)
        self.model = StagedModel(run.model).to(self.device)
        for stage in self.model.stages:
            stage.activation_checkpointing = activation_checkpointing
        self.amp_dtype = device_autocast_dtype(self.device, precision)
        # One process sees the whole backward: one scale for the whole step (a swarm stage has its own).
        self.scaler = LossScaler() if self.amp_dtype == torch.float16 else None
        self.opts = [StageOptimizer(s, run.train) for s in self.model.stages]
        self.step = 0
        self.tokens_seen = 0

    def autocast(self):
        """The forward's autocast, chosen as the swarm's stages choose it (swarm/precision.py)."""
        return autocast(self.device, self.amp_dtype)

    def microbatch(self, split: str, step: int, micro: int):
        t = self.run.train
        x, y = self.corpus.batch(split, t.microbatch_size, self.run.model.seq_len, self.run.model.seed, step, micro)
        return x.to(self.device), y.to(self.device)

    def train_step(self) -> float:
        m = self.run.train.microbatches
        total = 0.0
        for micro in range(m):
            x, y = self.microbatch("train", self.step, micro)
            with self.autocast():
                loss = lm_loss(self.model(x), y)
            (loss / m * (self.scaler.scale if self.scaler else 1.0)).backward()
            total += loss.item() / m
            self.tokens_seen += x.numel()
        if self._unscaled():
            for opt in self.opts:
                opt.step(self.step)
        for opt in self.opts:
            opt.zero_grad()
        self.step += 1
        return total

    def _unscaled(self) -> bool:
        """fp16: the step's gradients / S; False (skip the update, S halves) if any is inf/nan."""
        if self.scaler is None:
            return True
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = self.scaler.unscale([p.grad for p in params])
        for p, g in zip(params, grads or []):
            p.grad = g
        return grads is not None

    @torch.no_grad()
    def evaluate(self, batches: int = 8) -> float:
        self.model.eval()
        with self.autocast():
            losses = [lm_loss(self.model(x), y).item() for x, y in
                      (self.microbatch("val", 0, i) for i in range(batches))]
        self.model.train()
        return sum(losses) / len(losses)

    def state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "fingerprint": self.run.fingerprint,
                "config": self.run.wire_dict(), "model": self.model.state_dict(),
                "optimizers": [o.state_dict() for o in self.opts]}

    def save(self, path) -> None:
        atomic_save(self.state(), path)

    def resume(self, path) -> None:
        ckpt = load(path, map_location=self.device)
        if ckpt.get("fingerprint") != self.run.fingerprint:
            from protocol.fingerprint import describe_diff
            diff = describe_diff(self.run.wire_dict(), ckpt.get("config", {}))
            raise ValueError(f"checkpoint {path} belongs to another run config: " + "; ".join(diff))
        self.model.load_state_dict(ckpt["model"])
        for opt, st in zip(self.opts, ckpt["optimizers"]):
            opt.load_state_dict(st)
        self.step, self.tokens_seen = ckpt["step"], ckpt["tokens_seen"]


def timed_steps(trainer: LocalTrainer, steps: int, eval_every: int = 0, on_step=None) -> dict:
    """Run `steps` steps; returns a history usable by the CLI and the benchmarks."""
    hist = {"step": [], "loss": [], "val_step": [], "val_loss": [], "step_time": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = trainer.train_step()
        hist["step_time"].append(time.perf_counter() - t0)
        hist["step"].append(trainer.step)
        hist["loss"].append(loss)
        if eval_every and trainer.step % eval_every == 0:
            hist["val_step"].append(trainer.step)
            hist["val_loss"].append(trainer.evaluate())
        if on_step:
            on_step(trainer, hist)
    return hist
