"""One-file model export: all stages' weights in a safetensors file, with the run config inside.

Keys are those of StagedModel.state_dict() ("stages.<k>.<param>"), so `train-local --init-from`
and `generate` load it straight into the reference model."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from swarm.config import RunConfig
from swarm.model import StagedModel


class MixedSteps(ValueError):
    """The stages' states are from different optimizer steps (the model would be a mix)."""


def common_step(available: dict[int, set[int]]) -> int | None:
    """The newest step for which every stage in `available` (stage -> steps it has) has a state."""
    steps = set.intersection(*available.values()) if available else set()
    return max(steps, default=None)


def check_one_step(steps: dict[int, int]) -> None:
    """Raise MixedSteps, naming the stages that disagree, unless every stage is at the same step."""
    if len(set(steps.values())) <= 1:
        return
    newest = max(steps.values())
    behind = {k: s for k, s in sorted(steps.items()) if s != newest}
    raise MixedSteps(f"stages are at different steps {dict(sorted(steps.items()))}: stage(s) "
                     f"{', '.join(f'{k} (step {s})' for k, s in behind.items())} behind step {newest}; "
                     f"pass --allow-mixed-steps to export them anyway")


def save_export(path: str, run: RunConfig, stage_states: dict[int, dict], steps: dict[int, int]) -> None:
    missing = [k for k in range(run.model.n_stages) if k not in stage_states]
    if missing:
        raise ValueError(f"cannot export: no state for stage(s) {missing}")
    tensors = {f"stages.{k}.{name}": t.detach().cpu().contiguous()
               for k, state in stage_states.items() for name, t in state.items()}
    meta = {"config": json.dumps(run.wire_dict()), "fingerprint": run.fingerprint, "steps": json.dumps(steps)}
    save_file(tensors, path, metadata=meta)


def load_export(path: str, device: str = "cpu") -> tuple[RunConfig, StagedModel, dict]:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} is not a resbm export (no run config in its metadata)")
    run = RunConfig.from_wire_dict(json.loads(meta["config"]))
    model = StagedModel(run.model)
    model.load_state_dict(load_file(path, device="cpu"), strict=True)
    return run, model.to(device), json.loads(meta.get("steps", "{}"))


def stage_weights(path: str, run: RunConfig, index: int) -> tuple[dict, int]:
    """(parameters of stage `index`, its step) from an export file of a run with the same model."""
    exported, model, steps = load_export(path)
    model_fields = lambda r: {k: v for k, v in r.wire_dict().items() if k.startswith("model.")}  # noqa: E731
    if model_fields(exported) != model_fields(run):
        raise ValueError(f"{path} holds another model than run {run.run_id} (its run: {exported.fingerprint})")
    return model.stages[index].state_dict(), int(steps.get(str(index), -1))


@torch.no_grad()
def generate(model: StagedModel, prompt: list[int], max_new: int, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0, start_id: int = 10) -> list[int]:
    """Sample `max_new` token ids after `prompt` (ids of the run's tokenizer; no KV cache: the context
    is re-run, cropped to seq_len). An empty prompt starts from `start_id` (a newline in bytes)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    tokens = list(prompt) or [start_id]
    start = len(tokens) if prompt else 1
    for _ in range(max_new):
        ctx = torch.tensor([tokens[-model.cfg.seq_len:]], device=device)
        logits = model(ctx)[0, -1].float().cpu()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            top = torch.topk(logits / temperature, min(top_k, logits.numel()))
            nxt = int(top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)])
        tokens.append(nxt)
    return tokens[start:]
