"""What a GPU node does differently from a CPU node, checked on the CPU: Muon state moving between a
CPU replica and a GPU replica (torch.optim.Muon with bf16 Newton-Schulz, run here on CPU tensors),
activation checkpointing, the autocast choice and fp16's per-stage loss scaler."""
import dataclasses
import io
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from node.cli import parse_args
from node.lifecycle import build_worker
from node.settings import DeviceSettings, JoinSettings
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.optim import Muon
from swarm.precision import PRECISIONS, LossScaler, autocast_dtype
from swarm.stage_worker import StageWorker
from swarm.local_trainer import LocalTrainer

SHAPES = [(24, 8), (8, 16)]  # a tall and a wide matrix: Newton-Schulz transposes the tall one
LR = 0.02
RUN = RunConfig(model=ModelConfig(d_model=32, n_layers=3, n_heads=2, seq_len=8, n_stages=3, ratio=8),
                train=TrainConfig(batch_size=8, microbatches=4, optimizer="muon"))
LEGACY_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "params")  # the old CPU-only Muon32's groups


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _step(opt, params, seed):
    g = torch.Generator().manual_seed(100 + seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def _torch_muon(params):
    """What a GPU replica ran before: torch's own Muon (bf16 Newton-Schulz)."""
    return torch.optim.Muon(params, lr=LR, adjust_lr_fn="match_rms_adamw")


def _wire(state):
    """A state as a peer receives it: serialized (state_dict() shares the live tensors)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def _legacy(state):
    return {**state, "param_groups": [{k: g[k] for k in LEGACY_KEYS} for g in state["param_groups"]]}


def _momenta(opt):
    return [s["momentum_buffer"] for s in opt.state.values()]


def test_cpu_muon_state_steps_in_torch_muon_with_the_same_math():
    cpu = _params()
    ours = Muon(cpu, lr=LR)
    for i in range(2):
        _step(ours, cpu, i)
    gpu, same = _clone(cpu), _clone(cpu)
    theirs, ours_bf16 = _torch_muon(gpu), Muon(same, lr=LR, precision=torch.bfloat16)
    theirs.load_state_dict(_wire(ours.state_dict()))  # the old KeyError: 'ns_coefficients' came at its step
    ours_bf16.load_state_dict(_wire(ours.state_dict()))
    _step(theirs, gpu, 2)
    _step(ours_bf16, same, 2)
    assert all(torch.equal(a, b) for a, b in zip(gpu, same))  # bf16 Newton-Schulz: torch's, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(_momenta(theirs), _momenta(ours_bf16)))


def test_torch_muon_state_steps_on_a_cpu_replica():
    gpu = _params(1)
    theirs = _torch_muon(gpu)
    for i in range(2):
        _step(theirs, gpu, i)
    cpu = _clone(gpu)
    ours = Muon(cpu, lr=LR)
    ours.load_state_dict(_wire(theirs.state_dict()))
    _step(theirs, gpu, 2)
    _step(ours, cpu, 2)
    assert all(torch.equal(a, b) for a, b in zip(_momenta(theirs), _momenta(ours)))
    # fp32 vs bf16 Newton-Schulz: the update (lr * 0.2 * sqrt(24) ~ 0.02 per entry) differs by bf16 rounding
    torch.testing.assert_close(cpu, gpu, atol=2e-3, rtol=0)
    assert not all(torch.equal(a, b) for a, b in zip(cpu, gpu))  # the precisions really differ


def test_a_legacy_muon32_state_loads_and_steps():
    cpu = _params(2)
    ours = Muon(cpu, lr=LR)
    _step(ours, cpu, 0)
    legacy = _legacy(_wire(ours.state_dict()))
    stock = _torch_muon(_clone(cpu))
    stock.load_state_dict(_wire(legacy))
    with pytest.raises(KeyError, match="ns_coefficients"):  # torch's own Muon cannot read it: why we translate
        _step(stock, stock.param_groups[0]["params"], 1)
    a, b = _clone(cpu), _clone(cpu)
    old, new = Muon(a, lr=LR), Muon(b, lr=LR)
    old.load_state_dict(legacy)
    new.load_state_dict(_wire(ours.state_dict()))
    assert old.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    _step(old, a, 1)
    _step(new, b, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _code(seed, width=None):
    return torch.randn(2, 8, width or RUN.model.code_width, generator=torch.Generator().manual_seed(seed))


def _walks(w, seeds):
    for s in seeds:
        handle, out = w.begin(_code(s))
        w.finish(handle, _code(s + 50))


def test_a_worker_resumes_a_legacy_checkpoint_and_steps_as_the_live_replica():
    live, joiner = StageWorker(RUN, 1), StageWorker(RUN, 1)
    _walks(live, range(4))
    state = _wire(live.state_dict())
    state["optimizer"] = [_legacy(state["optimizer"][0])] + state["optimizer"][1:]
    joiner.load_state_dict(state)            # the path of node/state_sync.py and the checkpoint loader
    _walks(live, range(4, 8))
    _walks(joiner, range(4, 8))
    assert joiner.applied_step == live.applied_step == 1
    assert all(torch.equal(a, b) for a, b in zip(live.params, joiner.params))


# --- activation checkpointing ------------------------------------------------------------------
@pytest.mark.parametrize("index", [0, 1, 2])
def test_activation_checkpointing_gives_the_same_gradients(index):
    plain, ckpt = StageWorker(RUN, index), StageWorker(RUN, index, activation_checkpointing=True)
    tokens = torch.randint(0, RUN.model.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    x = tokens if index == 0 else _code(1)
    grads = []
    for w in (plain, ckpt):
        if index == RUN.model.n_stages - 1:
            _, g, _ = w.loss_step(x, tokens, tokens)
        else:
            handle, out = w.begin(x, tokens)
            g, _ = w.finish(handle, torch.ones_like(out))
        grads.append((g, [p.grad.clone() for p in w.params]))
    (g0, p0), (g1, p1) = grads
    if index > 0:
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-7)
    assert sum(float(p.abs().sum()) for p in p0) > 0


# --- precision -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device,bf16,requested,want", [
    ("cuda", True, "auto", torch.bfloat16), ("cuda", False, "auto", torch.float16), ("cpu", False, "auto", None),
    ("cpu", True, "auto", None), ("cuda", True, "fp16", torch.float16), ("cuda", False, "fp32", None),
    ("cpu", False, "bf16", torch.bfloat16), ("meta", False, "auto", None)])
def test_autocast_dtype_follows_the_device(device, bf16, requested, want):
    assert autocast_dtype(device, bf16, requested) is want


def test_autocast_dtype_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="no bf16 support"):
        autocast_dtype("cuda", False, "bf16")
    with pytest.raises(ValueError, match="choose one of"):
        autocast_dtype("cuda", True, "fp8")


def test_loss_scaler_unscales_skips_halves_and_grows():
    s = LossScaler(init_scale=8.0, growth_interval=2)
    assert s.unscale([torch.tensor([8.0, 16.0]), None])[0].tolist() == [1.0, 2.0]
    assert s.scale == 8.0 and s.clean == 1
    assert s.unscale([torch.tensor([1.0]), torch.tensor([float("inf")])]) is None
    assert s.scale == 4.0 and s.clean == 0 and s.overflows == 1
    assert s.unscale([torch.tensor([float("nan")])]) is None and s.scale == 2.0
    s.unscale([torch.ones(1)])
    s.unscale([torch.ones(1)])
    assert s.scale == 4.0  # two clean backwards in a row: S doubles
    tiny = LossScaler(init_scale=1.0)
    tiny.unscale([torch.tensor([float("inf")])])
    assert tiny.scale == 1.0  # never below min_scale
    with pytest.raises(ValueError):
        LossScaler(init_scale=0)


def test_a_scaled_stage_backward_equals_the_plain_one_and_skips_an_overflow():
    plain, scaled = StageWorker(RUN, 1), StageWorker(RUN, 1)
    scaled.scaler = LossScaler(init_scale=2.0 ** 10)  # fp16's path, on fp32 tensors
    outs = []
    for w in (plain, scaled):
        handle, out = w.begin(_code(1))
        outs.append(w.finish(handle, _code(2))[0])
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close([p.grad for p in scaled.params], [p.grad for p in plain.params])
    kept = [p.grad.clone() for p in scaled.params]
    handle, out = scaled.begin(_code(3))
    bad = _code(4)
    bad[0, 0, 0] = float("inf")
    grad_in, outcome = scaled.finish(handle, bad)
    assert torch.equal(grad_in, torch.zeros_like(grad_in)) and outcome["added"] and scaled.accumulated == 2
    assert all(torch.equal(a, p.grad) for a, p in zip(kept, scaled.params))  # nothing added
    assert scaled.scaler.scale == 2.0 ** 9 and scaled.scaler.overflows == 1


def test_a_scaled_loss_step_equals_the_plain_one():
    plain, scaled = StageWorker(RUN, 2), StageWorker(RUN, 2)
    scaled.scaler = LossScaler(init_scale=2.0 ** 12)
    tokens = torch.randint(0, RUN.model.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5))
    (l0, g0, _), (l1, g1, _) = (w.loss_step(_code(6), tokens, tokens) for w in (plain, scaled))
    assert l0 == l1
    torch.testing.assert_close(g1, g0)
    torch.testing.assert_close([p.grad for p in scaled.params], [p.grad for p in plain.params])


def test_a_scaled_local_step_equals_the_plain_one_and_an_overflow_skips_it():
    corpus = ByteCorpus(max_bytes=1 << 16)
    plain, scaled = LocalTrainer(RUN, corpus), LocalTrainer(RUN, corpus)
    scaled.scaler = LossScaler(init_scale=2.0 ** 8)  # fp16's whole-step scaling, on fp32 tensors
    plain.train_step()
    scaled.train_step()
    torch.testing.assert_close(list(scaled.model.parameters()), list(plain.model.parameters()))
    hook = scaled.model.stages[1].blocks[0].mlp.wo.weight.register_hook(lambda g: g * float("inf"))  # an overflow
    before = [p.detach().clone() for p in scaled.model.parameters()]
    scaled.train_step()
    hook.remove()
    assert all(torch.equal(a, p) for a, p in zip(before, scaled.model.parameters()))  # the update was skipped
    assert scaled.scaler.overflows == 1 and scaled.scaler.scale == 2.0 ** 7 and scaled.step == 2
    assert all(p.grad is None for p in scaled.model.parameters())

# --- bench/gpu_check.py, prepared for a GPU machine --------------------------------------------------
def test_gpu_check_skips_without_cuda_and_its_comparison_runs_on_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--json-out", str(tmp_path / "r.json")]) == 0
    assert capsys.readouterr().out.strip().startswith("skipped: no CUDA") and not (tmp_path / "r.json").exists()
    result = gpu_check.check("tiny", torch.device("cpu"))  # CPU against CPU: every figure exact
    assert result["ok"] and {r["grad_rel_error"] for r in result["rows"]} == {0.0}
    assert all(m["loaded_equal"] and m["update_rel_diff"] == 0.0 for m in result["handover"])
    assert "| cpu" in gpu_check.report(result)


# --- the node flags (node/settings.py DeviceSettings -> node/lifecycle.py build_worker) -----------
def test_node_flags_reach_the_worker_but_not_the_run_config():
    argv = ["join", "--stage", "1", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x", "--precision", "fp16"]
    settings = JoinSettings.from_args(parse_args(argv, environ={"RESBM_ACTIVATION_CHECKPOINTING": "1"})).device
    assert settings.precision == "fp16" and settings.activation_checkpointing
    w = build_worker(RUN, 1, torch.device("cpu"), settings)
    assert w.stage.activation_checkpointing and w.amp_dtype is torch.float16 and w.scaler is not None
    plain = build_worker(RUN, 1, torch.device("cpu"))
    assert not plain.stage.activation_checkpointing and plain.amp_dtype is None and plain.scaler is None
    assert w.state_dict()["fingerprint"] == plain.state_dict()["fingerprint"] == RUN.fingerprint
    with pytest.raises(SystemExit):
        parse_args(argv[:-1] + ["fp8"])
    choices = next(f for f in dataclasses.fields(DeviceSettings) if f.name == "precision").metadata["choices"]
    assert tuple(choices) == PRECISIONS  # settings.py keeps its own copy (it imports no torch)


# --- packaging ---------------------------------------------------------------------------------------
def test_the_systemd_unit_lets_the_gpu_through_and_the_image_can_be_cuda():
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    lines = [ln.strip() for ln in (deploy / "resbm-node.service").read_text().splitlines() if not ln.startswith("#")]
    assert not any(ln.startswith("PrivateDevices=") and ln.split("=", 1)[1] in ("yes", "true", "1") for ln in lines)
    allowed = {ln.split("=", 1)[1].split()[0] for ln in lines if ln.startswith("DeviceAllow=")}
    assert {"char-nvidia-frontend", "char-nvidia-uvm"} <= allowed and "DevicePolicy=closed" in lines
    docker = (deploy / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in docker  # CPU stays the default
    assert 'pip install --index-url "$TORCH_INDEX_URL" torch==' in docker
