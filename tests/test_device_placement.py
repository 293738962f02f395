"""Parameters and optimizer state end on the stage's device after every kind of load a joining node
does (live replica, its checkpoint, an export file), and Muon's variant follows the real device.

No GPU here: the joiner is built on torch's "meta" device, which has no data but a real device tag,
so a moment left on the CPU (the old build-on-CPU, load, then .to(device) order) is caught exactly
as it would be on CUDA."""
import asyncio

import pytest
import torch

from node.dht import start_dht
from bench.inproc import InprocSwarm
from node.lifecycle import build_worker
from node.state_sync import initial_state
from swarm.checkpoint import atomic_write_bytes
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.export import save_export
from swarm.optim import Muon, ns_dtype
from swarm.stage_worker import StageWorker

pytestmark = [pytest.mark.swarm, pytest.mark.filterwarnings("ignore:.*meta parameter")]
META = torch.device("meta")


def _run(run_id: str, optimizer: str = "muon") -> RunConfig:
    model = ModelConfig(d_model=64, n_layers=3, n_heads=2, seq_len=32, n_stages=3, ratio=16)
    return RunConfig(model=model, train=TrainConfig(batch_size=8, microbatches=4, optimizer=optimizer), run_id=run_id)


def misplaced(worker) -> list[str]:
    """Optimizer parameters that are not the stage's own (a stage moved after its optimizer was made),
    and optimizer state tensors not on their parameter's device. torch keeps AdamW's scalar `step` on
    the CPU by design (not capturable), so 0-dim tensors are allowed there."""
    owned = {id(p) for p in worker.stage.parameters()}
    out = [f"foreign parameter on {p.device}" for opt in worker.opt.opts for group in opt.param_groups
           for p in group["params"] if id(p) not in owned]
    for opt in worker.opt.opts:
        for p, state in opt.state.items():
            out += [f"{k}: {v.device} vs {p.device}" for k, v in state.items()
                    if torch.is_tensor(v) and v.device != p.device and not (k == "step" and v.ndim == 0)]
    return out


def _moments(worker) -> int:
    return sum(torch.is_tensor(v) and v.ndim > 0 for o in worker.opt.opts for s in o.state.values() for v in s.values())


async def _trained_states(run):
    """Stage 2 of a real swarm after two steps: (its state, every stage's model state)."""
    async with InprocSwarm(run, ByteCorpus(max_bytes=1 << 20)) as sw:
        await sw.train(2)
        live = sw.servers[2][0].worker
        joiner = build_worker(run, 2, META)
        message = await sw.load_joiner(joiner)
        models = {0: sw.trainers[0].worker.stage.state_dict(), 1: sw.servers[1][0].worker.stage.state_dict(),
                  2: live.stage.state_dict()}
        return message, joiner, live.state_bytes(), models


async def _load_alone(run, checkpoint=None, export=None):
    dht = start_dht(run.run_id)  # nobody else: no live replica
    try:
        p2p = await dht.replicate_p2p()
        worker = build_worker(run, 2, META)
        message = await initial_state(dht, p2p, worker, checkpoint, str(dht.peer_id), export)
        await p2p.shutdown()
        return message, worker
    finally:
        dht.shutdown()


def test_every_load_puts_optimizer_state_on_the_parameters_device(tmp_path):
    run = _run("placement")
    message, joiner, state_bytes, models = asyncio.run(_trained_states(run))
    assert "from live replica" in message and joiner.applied_step == 1
    assert _moments(joiner) > 0 and misplaced(joiner) == []
    assert all(p.device == META for p in joiner.stage.parameters())

    atomic_write_bytes(state_bytes, tmp_path / "c.pt")
    message, resumed = asyncio.run(_load_alone(run, checkpoint=tmp_path / "c.pt"))
    assert "resumed from checkpoint" in message and resumed.applied_step == 1
    assert _moments(resumed) > 0 and misplaced(resumed) == []

    save_export(str(tmp_path / "m.st"), run, models, {0: 1, 1: 1, 2: 1})
    message, exported = asyncio.run(_load_alone(run, export=str(tmp_path / "m.st")))
    assert "weights from export" in message and exported.applied_step == 1
    assert all(p.device == META for p in exported.stage.parameters()) and misplaced(exported) == []

    # The order join used before (build on the CPU, load, then move) is what this test catches.
    old = StageWorker(run, 2)
    old.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    old.stage.to(META)
    assert misplaced(old)


def test_an_export_of_another_model_is_refused(tmp_path):
    run = _run("other")
    bigger = RunConfig(model=run.model.replace(d_model=128, ratio=32), train=run.train, run_id="other")
    save_export(str(tmp_path / "big.st"), bigger, {k: build_worker(bigger, k, torch.device("cpu")).stage.state_dict()
                                                   for k in range(3)}, {})
    message, worker = asyncio.run(_load_alone(run, export=str(tmp_path / "big.st")))
    assert "starting from initialisation" in message and worker.applied_step == -1


def test_muon_precision_follows_the_real_device():
    assert ns_dtype(torch.device("cuda")) is torch.bfloat16
    assert ns_dtype(torch.device("cpu")) is torch.float32 and ns_dtype(META) is torch.float32
    assert isinstance(StageWorker(_run("m"), 1).opt.opts[0], Muon)
    assert isinstance(StageWorker(_run("m"), 1, device=META).opt.opts[0], Muon)
