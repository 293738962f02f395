"""Rough memory need of one stage, so a node can refuse a stage that will not fit before it starts."""
from __future__ import annotations

from swarm.config import RunConfig
from swarm.model import Stage


def stage_memory_bytes(run: RunConfig, index: int, param_count: int) -> dict:
    cfg, t = run.model, run.train
    # fp32 weights + one gradient buffer (however many microbatches are in flight: StageWorker adds
    # into it) + two optimizer moments (AdamW; Muon keeps one, so this is an upper bound)
    params = param_count * 4 * 4
    layers = cfg.stage_layers[index]
    tokens = t.microbatch_size * cfg.seq_len
    # saved activations per layer and token: ~ (qkv 3d + attn out d + 2 norms 2d + swiglu 3f + residual 2d)
    per_layer_token = 4 * (8 * cfg.d_model + 3 * cfg.ffn_dim)
    inflight = 2 * t.microbatches + 2  # forward graphs held at once: one per microbatch in flight here
    acts = per_layer_token * layers * tokens * inflight
    if index == cfg.n_stages - 1:
        acts += 4 * 2 * cfg.vocab_size * tokens  # logits and their gradient
    return {"params_bytes": params, "activations_bytes": acts, "total_bytes": params + acts}


def available_bytes(device) -> int:
    import os
    import torch
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(run: RunConfig, index: int, stage: Stage, device) -> dict:
    need = stage_memory_bytes(run, index, sum(p.numel() for p in stage.parameters()))
    have = available_bytes(device)
    need["available_bytes"] = have
    if need["total_bytes"] > 0.9 * have:
        raise MemoryError(f"stage {index} needs about {need['total_bytes'] / 2**30:.2f} GiB "
                          f"({need['params_bytes'] / 2**30:.2f} GiB parameters+optimizer, "
                          f"{need['activations_bytes'] / 2**30:.2f} GiB activations) but {device} has "
                          f"{have / 2**30:.2f} GiB free; pick a smaller stage, fewer microbatches or another device")
    return need
