"""Memory one stage holds while it serves, so a node can refuse a stage that will not fit before it starts.

What a replica holds on the barrier-free data path (swarm/stage_worker.py, docs/data-path.md):
  - fp32 weights, ONE gradient buffer (every microbatch adds into it, however many are in flight),
    the optimizer's state (Muon: one moment per hidden matrix; AdamW: two per parameter);
  - the forward graphs of microbatches between their forward and backward: at most M = microbatches
    per step are kept (older ones keep only their input code and are recomputed), and one more
    exists while a forward is built or a stale one recomputed; the last stage runs forward, loss and
    backward in one call, so it holds one graph;
  - the backward's working set, counted as one block's activations: the gradients flowing through a
    block while the other graphs are held, or with checkpointing the block it recomputes. The last
    stage's own graph is freed as its backward runs, so there the working set is the loss's logits,
    log-softmax and gradient (and the recomputed block with checkpointing).
Activations are counted per token from what autograd saves in each module (tests/test_memory_estimate.py
checks the count against torch's saved tensors and the whole estimate against measured peak RSS).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from swarm.config import ModelConfig, RunConfig
from swarm.optim import muon_split
from swarm.precision import device_autocast_dtype

FP32 = 4


def block_saved(cfg: ModelConfig) -> tuple[int, int]:
    """Numbers one transformer block saves for backward per token: (kept in fp32, in the autocast
    dtype). fp32: the residual input of both norms and their normalised x (2d + 1 each). The rest
    are matmul inputs/outputs: attention keeps its input, q, k, v, the output and its reshaped copy
    (6d); without grouped-query heads v is a view of the fused qkv output, which then stays whole
    (+2d); SDPA's logsumexp (one per head); SwiGLU keeps its input, gate|up (2f), silu and product."""
    d, f = cfg.d_model, cfg.ffn_dim
    fused_v = 2 * d if cfg.n_kv_heads == cfg.n_heads else 0
    return 4 * d + 2, 6 * d + fused_v + cfg.n_heads + d + 4 * f


def boundary_saved(cfg: ModelConfig, index: int) -> int:
    """Numbers per token the stage's ends save (fp32): receiver (code and Dec's hidden), sender
    (Norm(h) and Enc's hidden), or the last stage's norm; the embedding's token ids count as 2 (int64)."""
    d, b, m = cfg.d_model, cfg.code_width, cfg.enc_hidden
    learned = cfg.boundary in ("resbm", "bottleneck")
    n = 2 if index == 0 and cfg.boundary != "subspace" else 0  # a fixed (subspace) embedding saves none
    if index > 0 and learned:
        n += b + (2 * m if cfg.boundary == "resbm" else 0)
    if index == cfg.n_stages - 1:
        n += 3 * d + 1
    elif learned:
        n += 3 * d + 1 + (2 * m if cfg.boundary == "resbm" else 0)
    return n


def loss_saved(cfg: ModelConfig) -> int:
    """The last stage's logits, their log-softmax and their gradient (fp32: lm_loss upcasts)."""
    return 3 * cfg.vocab_size


def graph_bytes_per_token(cfg: ModelConfig, index: int, act_bytes: int, checkpointing: bool) -> int:
    """Bytes one kept forward graph holds per token. With checkpointing a block keeps only its input."""
    layers = cfg.stage_layers[index]
    if checkpointing:
        blocks = layers * cfg.d_model * FP32
    else:
        f32, low = block_saved(cfg)
        blocks = layers * (f32 * FP32 + low * act_bytes)
    return blocks + boundary_saved(cfg, index) * FP32


def autocast_weight_copies(stage: nn.Module, checkpointing: bool) -> int:
    """Numbers of the low-precision weight copies autocast makes for a forward's matmuls, which its
    graph keeps (the embedding is a lookup, not cast; checkpointed blocks keep no graph of their own)."""
    return sum(p.numel() for n, p in stage.named_parameters()
               if p.ndim == 2 and not n.startswith("embed") and not (checkpointing and n.startswith("blocks.")))


def state_bytes(stage: nn.Module, optimizer: str) -> dict:
    """Weights, one gradient buffer and the optimizer's moments, from the stage's real parameters."""
    n = sum(p.numel() for p in stage.parameters())
    trainable = sum(p.numel() for p in stage.parameters() if p.requires_grad)
    if optimizer == "muon":
        hidden, rest = muon_split(stage)
        moments = sum(p.numel() for p in hidden) + 2 * sum(p.numel() for p in rest)
    else:
        moments = 2 * trainable
    return {"weights_bytes": n * FP32, "gradient_bytes": trainable * FP32, "optimizer_bytes": moments * FP32}


def stage_memory_bytes(run: RunConfig, index: int, stage: nn.Module, amp_dtype: torch.dtype | None = None,
                       activation_checkpointing: bool = False) -> dict:
    """The estimate, by part. `amp_dtype`: the forward's autocast dtype (None: fp32)."""
    cfg, t = run.model, run.train
    act_bytes = torch.finfo(amp_dtype).bits // 8 if amp_dtype is not None else FP32
    tokens = t.microbatch_size * cfg.seq_len
    last = index == cfg.n_stages - 1
    graphs = 1 if last else t.microbatches + 1
    per_graph = graph_bytes_per_token(cfg, index, act_bytes, activation_checkpointing) * tokens
    f32, low = block_saved(cfg)
    block = (f32 * FP32 + low * act_bytes) * tokens
    workspace = loss_saved(cfg) * FP32 * tokens + (block if activation_checkpointing else 0) if last else block
    if amp_dtype is not None:
        per_graph += autocast_weight_copies(stage, activation_checkpointing) * act_bytes
    out = state_bytes(stage, t.optimizer)
    if amp_dtype == torch.float16:  # the scaled backward returns a fresh gradient before adding it
        out["gradient_bytes"] *= 2
    out.update(graphs=graphs, graph_bytes=per_graph, activations_bytes=graphs * per_graph + workspace)
    out["params_bytes"] = out["weights_bytes"] + out["gradient_bytes"] + out["optimizer_bytes"]
    out["total_bytes"] = out["params_bytes"] + out["activations_bytes"]
    return out


def available_bytes(device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(run: RunConfig, index: int, stage: nn.Module, device, precision: str = "auto",
               activation_checkpointing: bool = False) -> dict:
    device = torch.device(device)
    need = stage_memory_bytes(run, index, stage, device_autocast_dtype(device, precision), activation_checkpointing)
    have = available_bytes(device)
    need["available_bytes"] = have
    if need["total_bytes"] > 0.9 * have:
        hint = "" if activation_checkpointing else ", --activation-checkpointing"
        raise MemoryError(f"stage {index} needs about {need['total_bytes'] / 2**30:.2f} GiB "
                          f"({need['params_bytes'] / 2**30:.2f} GiB parameters+gradient+optimizer, "
                          f"{need['activations_bytes'] / 2**30:.2f} GiB activations) but {device} has "
                          f"{have / 2**30:.2f} GiB free; pick a smaller stage, fewer microbatches{hint} or "
                          "another device")
    return need
