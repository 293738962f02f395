"""The swarm computes exactly what the reference trainer computes (real DHT, real libp2p streams).

The helpers at the top (tiny run, reference gradients, parameter comparison) are shared with
test_churn.py."""
import asyncio

import pytest
import torch

from node.client import StageClient
from protocol.errors import RemoteError
from protocol import PROTOCOL_VERSION
from protocol.codec import encode, encode_ints
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.model import lm_loss
from swarm.local_trainer import LocalTrainer
from bench.inproc import InprocSwarm
from node.settings import TrainerSettings

pytestmark = pytest.mark.swarm
STRANGER = "QmSomeoneElse1111111111111111111111111111111111"


@pytest.fixture(scope="module")
def corpus():
    return ByteCorpus(max_bytes=1 << 20)


def tiny_run(run_id: str, trainers=(), **model_kw) -> RunConfig:
    """3 stages of a d=64 model, 4 microbatches of 2 sequences: a step in well under a second."""
    model = ModelConfig(d_model=64, n_layers=3, n_heads=2, seq_len=32, n_stages=3, ratio=16, **model_kw)
    return RunConfig(model=model, train=TrainConfig(batch_size=8, microbatches=4, trainers=tuple(trainers)),
                     run_id=run_id)


def reference_gradients(run: RunConfig, corpus, slots) -> LocalTrainer:
    """train-local's gradients of `slots` of step 0 (each loss / microbatches, as the swarm scales it),
    left in .grad, not applied."""
    ref = LocalTrainer(run, corpus)
    for micro in slots:
        x, y = ref.microbatch("train", 0, micro)
        (lm_loss(ref.model(x), y) / run.train.microbatches).backward()
    return ref


def grads(worker) -> list:
    return [p.grad for p in worker.params]


def trainable(module) -> list:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def assert_grads_equal(ref_stage, got: list, label: str, rtol=1e-4, atol=1e-6) -> None:
    named = trainable(ref_stage)
    assert len(named) == len(got)
    for (n, p), g in zip(named, got):
        assert g is not None, f"{label} {n}: no gradient accumulated"
        torch.testing.assert_close(g, p.grad, rtol=rtol, atol=atol, msg=f"{label} {n}")


def params(worker) -> dict:
    """A copy of a replica's parameters (and buffers), to compare after it moved on."""
    return {n: v.detach().clone() for n, v in worker.stage.state_dict().items()}


def assert_params_equal(ref_stage, state: dict, label: str, rtol=1e-4, atol=1e-5) -> None:
    assert list(state) == list(ref_stage.state_dict())
    for (n, want), got in zip(ref_stage.state_dict().items(), state.values()):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=f"{label} {n}")


def stage_workers(sw: InprocSwarm, k: int) -> list:
    return [s.worker for s in sw.servers[k]]


def kill(server) -> None:
    """A node dies: its DHT process and the p2p daemon its handlers are served through go away, so
    its open streams break and nobody can reach it again. Call it from any thread."""
    server.view.dht.shutdown()


# --- parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec,codec_bwd", [("bf16", ""), ("int8", ""), ("int8ch", ""), ("int4ch", "int8ch"),
                                             ("fp8", "bf16")])
def test_accumulated_gradients_equal_reference(corpus, codec, codec_bwd):
    """Every codec pair crosses the real transport; after all but one microbatch of a step (so no
    replica has stepped yet) every stage's one gradient buffer holds the reference's sum."""
    run = tiny_run("parity", codec=codec, codec_bwd=codec_bwd)
    slots = range(run.train.microbatches - 1)
    ref = reference_gradients(run, corpus, slots)

    async def go():
        async with InprocSwarm(run, corpus) as sw:
            losses = await asyncio.gather(*(sw.trainers[0].microbatch(i) for i in slots))
            return losses, [stage_workers(sw, k)[0] for k in range(run.model.n_stages)]

    losses, workers = asyncio.run(go())
    assert all(torch.isfinite(torch.tensor(v)) for v in losses)
    for k, stage in enumerate(ref.model.stages):
        assert workers[k].accumulated == len(slots) and workers[k].applied_step == -1
        assert_grads_equal(stage, grads(workers[k]), f"stage {k}")


def test_sync_steps_follow_reference(corpus):
    """One trainer in sync mode, one replica per stage: every step is train-local's, nothing stale."""
    run = tiny_run("steps")
    ref = LocalTrainer(run, corpus)
    ref_losses = [ref.train_step() for _ in range(3)]

    async def go():
        async with InprocSwarm(run, corpus) as sw:
            (done,) = await sw.train(3)
            return done, [stage_workers(sw, k)[0] for k in range(run.model.n_stages)]

    done, workers = asyncio.run(go())
    torch.testing.assert_close(torch.tensor([d.loss for d in done]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    assert [d.step for d in done] == [0, 1, 2] and all(d.staleness == 0 for d in done)
    for k, stage in enumerate(ref.model.stages):
        assert workers[k].applied_step == 2 and workers[k].recomputed == 0
        assert_params_equal(stage, params(workers[k]), f"stage {k}")


def test_two_trainers_feed_without_waiting_for_each_other(corpus):
    """Two trainers with overlapping windows: each stage-0 replica steps on its own microbatches, the
    shared stages step on everyone's, a microbatch whose forward predates a step is recomputed
    (staleness counted), and gradient memory stays one buffer per stage."""
    run = tiny_run("two")
    m = run.train.microbatches

    async def go():
        settings = TrainerSettings(window=2 * m)
        async with InprocSwarm(run, corpus, trainers=2, settings=settings) as sw:
            done = await sw.train(3)
            fed = sum(t.drawn for t in sw.trainers)
            return done, fed, [stage_workers(sw, k) for k in range(run.model.n_stages)]

    done, fed, workers = asyncio.run(go())
    assert [[d.step for d in steps] for steps in done] == [[0, 1, 2], [0, 1, 2]]
    assert all(torch.isfinite(torch.tensor(d.loss)) for steps in done for d in steps)
    for k in (1, 2):
        (w,) = workers[k]
        applied = (w.applied_step + 1) * m + w.accumulated
        assert 2 * 3 * m <= applied <= fed      # everyone's microbatches, none twice
        assert w.applied_step >= 5
    stale = [w.recomputed for k in range(3) for w in workers[k]]
    assert sum(stale) > 0                       # overlap across steps happened, and was recomputed
    assert not any(hasattr(w, "grads") for k in range(3) for w in workers[k])


# --- refusals -------------------------------------------------------------------------------------
def _train_fields(run, owner: str, step: int, code=None) -> dict:
    cfg = run.model
    code = code if code is not None else torch.zeros(2, cfg.seq_len, cfg.code_width)
    return dict(owner=owner, step=step, micro=0, timeout_s=10.0, x=encode(code, cfg.wire_codec),
                targets=encode_ints(torch.zeros(2, cfg.seq_len, dtype=torch.long), cfg.vocab_size))


async def _refusal(client, peer, stage: int, method: str, **fields) -> tuple[str, str]:
    with pytest.raises(RemoteError) as err:
        await client.call(peer, stage, method, timeout=10, **fields)
    return err.value.reason, str(err.value)


def test_bad_requests_are_refused(corpus):
    run = tiny_run("refusals")

    async def go():
        async with InprocSwarm(run, corpus) as sw:
            trainer = sw.trainers[0]
            await sw.train(1)
            me, peer, tail = trainer.peer_id, sw.servers[1][0].peer_id, sw.servers[2][0].peer_id
            p2p = trainer.hop.client.p2p
            client, stranger = StageClient(p2p, run), StageClient(p2p, run)
            stranger.fingerprint = "0" * 16
            x = encode(torch.zeros(2, 32, run.model.code_width), run.model.wire_codec)
            wide = torch.zeros(2, 32, run.model.d_model)
            errors = {
                "fingerprint": await _refusal(stranger, peer, 1, "forward", x=x),
                "version": await _refusal(client, peer, 1, "forward", x=x, v=PROTOCOL_VERSION + 1),
                "shape": await _refusal(client, peer, 1, "train", **_train_fields(run, me, 1, wide)),
                "not upstream": await _refusal(client, tail, 2, "train", **_train_fields(run, me, 1)),
            }
            ok, _, _ = await client.call(peer, 1, "forward", x=x, timeout=10)
            return errors, ok, sw.servers[2][0].worker.accumulated

    errors, ok, tail_held = asyncio.run(go())
    assert errors["fingerprint"][0] == "fingerprint" and "another run config" in errors["fingerprint"][1]
    assert errors["version"][0] == "version"
    assert errors["shape"] == ("shape", "shape: last dimension is 64, this boundary carries 4 values per token")
    assert errors["not upstream"][0] == "forbidden" and "not a replica of stage 1" in errors["not upstream"][1]
    assert tail_held == 0                 # the refused call left nothing behind
    assert ok["ok"] and ok["y"]["shape"] == [2, 32, 4]


def test_only_the_runs_trainers_may_drive_training(corpus):
    """The run lists one trainer, not ours: our train calls are refused, reading is open."""
    run = tiny_run("authz", trainers=(STRANGER,))

    async def go():
        async with InprocSwarm(run, corpus) as sw:
            trainer, server = sw.trainers[0], sw.servers[1][0]
            client = trainer.hop.client
            errors = {"train": await _refusal(client, server.peer_id, 1, "train",
                                              **_train_fields(run, trainer.peer_id, 0))}
            with pytest.raises(RemoteError) as own:
                await trainer.microbatch(0)
            info = await client.info(server.peer_id, 1, timeout=10)
            return errors, own.value, info, server.worker.applied_step, server.worker.accumulated

    errors, own, info, applied, held = asyncio.run(go())
    assert errors["train"][0] == "forbidden" and "not one of this run's trainers" in errors["train"][1]
    assert own.reason == "forbidden"         # the trainer's own route gives up on a refusal, says why
    assert applied == -1 and held == 0       # a stranger cannot push the step counter nor add gradients
    assert info["stage"] == 1                # reading is open
