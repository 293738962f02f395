"""The swarm computes exactly what the reference trainer computes (real DHT, real libp2p streams)."""
import asyncio

import pytest
import torch

from node.client import RemoteError, StageClient
from protocol import PROTOCOL_VERSION
from protocol.codec import encode
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.trainer import LocalTrainer
from node.inproc import InprocSwarm

pytestmark = pytest.mark.swarm


@pytest.fixture(scope="module")
def corpus():
    return ByteCorpus(max_bytes=1 << 20)


def _run(**kw):
    model = ModelConfig(d_model=64, n_layers=3, n_heads=2, seq_len=32, n_stages=3, ratio=16, **kw)
    return RunConfig(model=model, train=TrainConfig(batch_size=8, microbatches=4), run_id="parity")


@pytest.mark.parametrize("codec,codec_bwd", [("bf16", ""), ("int8", ""), ("int8ch", ""), ("int4ch", "int8ch"),
                                             ("fp8", "bf16")])
def test_gradients_equal_reference(corpus, codec, codec_bwd):
    """Every codec pair crosses the real transport and gives exactly the reference's gradients."""
    run = _run(codec=codec, codec_bwd=codec_bwd)
    ref = LocalTrainer(run, corpus)
    m = run.train.microbatches
    for micro in range(m):
        x, y = ref.microbatch("train", 0, micro)
        from swarm.model import lm_loss
        (lm_loss(ref.model(x), y) / m).backward()

    async def swarm_grads():
        async with InprocSwarm(run, corpus) as sw:
            losses = await asyncio.gather(*(sw.head.microbatch(0, i) for i in range(m)))
            stages = [sw.head.worker.stage] + [sw.servers[k][0].worker.stage for k in (1, 2)]
            return losses, [{n: p.grad.clone() for n, p in s.named_parameters()} for s in stages]

    losses, grads = asyncio.run(swarm_grads())
    assert all(torch.isfinite(torch.tensor(losses)))
    for k, stage in enumerate(ref.model.stages):
        for n, p in stage.named_parameters():
            torch.testing.assert_close(grads[k][n], p.grad, rtol=1e-4, atol=1e-6, msg=f"stage {k} {n}")


def test_steps_follow_reference_and_bad_requests_are_refused(corpus):
    run = _run()
    ref = LocalTrainer(run, corpus)
    ref_losses = [ref.train_step() for _ in range(3)]

    async def go():
        async with InprocSwarm(run, corpus) as sw:
            losses = [(await sw.head.train_step(s))["loss"] for s in range(3)]
            server = sw.servers[1][0]
            peer = server.peer_id
            client, stranger = StageClient(sw.head.p2p, run), StageClient(sw.head.p2p, run)
            stranger.fingerprint = "0" * 16
            x = encode(torch.zeros(2, 32, run.model.code_width), run.model.wire_codec)
            wide = encode(torch.zeros(2, 32, run.model.d_model), run.model.wire_codec)
            errors = {}
            for name, (who, fields) in {
                "fingerprint": (stranger, dict(step=9, micro=0, x=x)),
                "version": (client, dict(step=9, micro=0, x=x, v=PROTOCOL_VERSION + 1)),
                "shape": (client, dict(step=9, micro=0, x=wide)),
                "state": (client, dict(step=0, micro=0, x=x)),
            }.items():
                with pytest.raises(RemoteError) as err:
                    await who.call(peer, 1, "forward", timeout=10, **fields)
                errors[name] = (err.value.reason, str(err.value))
            ok, _, _ = await client.call(peer, 1, "forward", step=9, micro=0, x=x, timeout=10)
            return losses, errors, ok, [s.worker.stage.state_dict() for s in (sw.servers[1][0], sw.servers[2][0])]

    losses, errors, ok, states = asyncio.run(go())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-4)
    for k, state in zip((1, 2), states):
        for n, v in ref.model.stages[k].state_dict().items():
            torch.testing.assert_close(state[n], v, rtol=1e-3, atol=1e-4, msg=f"stage {k} {n}")
    assert errors["fingerprint"][0] == "fingerprint" and "another run config" in errors["fingerprint"][1]
    assert errors["version"][0] == "version"
    assert errors["shape"] == ("shape", "shape: last dimension is 64, this boundary carries 4 values per token")
    assert errors["state"][0] == "state"  # step 0 is already applied: no late request can change it
    assert ok["ok"] and ok["y"]["shape"] == [2, 32, 4]



def test_only_the_runs_trainers_may_drive_training(corpus):
    model = ModelConfig(d_model=64, n_layers=3, n_heads=2, seq_len=32, n_stages=3, ratio=16)
    run = RunConfig(model=model, train=TrainConfig(batch_size=8, microbatches=4,
                                                   trainers=("QmSomeoneElse1111111111111111111111111111111111",)),
                    run_id="authz")

    async def go():
        async with InprocSwarm(run, corpus) as sw:
            with pytest.raises(RemoteError) as err:
                await sw.head.microbatch(0, 0)
            peer = sw.servers[1][0].peer_id
            client = StageClient(sw.head.p2p, run)
            info = await client.info(peer, 1, timeout=10)
            with pytest.raises(RemoteError) as step_err:
                await client.call(peer, 1, "step", step=10 ** 9, timeout=10)
            return err.value, info, step_err.value, sw.servers[1][0].worker.applied_step

    err, info, step_err, applied = asyncio.run(go())
    assert err.reason == "forbidden" and "not among them" in str(err)
    assert step_err.reason == "forbidden" and applied == -1  # a stranger cannot push the step counter
    assert info["stage"] == 1                                 # reading is open


def test_a_restarted_head_redoes_a_half_done_step_exactly_once(corpus):
    """The head dies after some microbatches of step 0 reached the stages (gradients held, never
    applied). A new head (a new session) redoes step 0: the stages drop the dead run's gradients
    instead of refusing the new run's, and apply the step exactly once: as the reference does."""
    from node.head import Head
    from node.metrics import NodeMetrics
    from swarm.stage_worker import StageWorker
    run = _run()
    ref = LocalTrainer(run, corpus)
    ref_loss = ref.train_step()

    async def go():
        async with InprocSwarm(run, corpus) as sw:
            await asyncio.gather(*(sw.head.microbatch(0, i) for i in range(2)))  # then the head "dies"
            new = Head(StageWorker(run, 0), corpus, sw.head.dht, sw.head.p2p, NodeMetrics(), stall_timeout=60)
            result = await new.train_step(0)
            stages = [sw.servers[k][0].worker for k in (1, 2)]
            return result, new.retries, [w.stage.state_dict() for w in stages], [w.discarded_steps for w in stages]

    result, retries, states, discarded = asyncio.run(go())
    assert result["loss"] == pytest.approx(ref_loss, rel=1e-4)
    assert retries == 0 and discarded == [1, 1]
    for k, state in zip((1, 2), states):
        for n, v in ref.model.stages[k].state_dict().items():
            torch.testing.assert_close(state[n], v, rtol=1e-3, atol=1e-4, msg=f"stage {k} {n}")
