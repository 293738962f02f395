"""The swarm computes exactly what the reference trainer computes (real DHT, real libp2p streams).

The helpers at the top (tiny run, reference gradients, held-gradient sums) are shared with
test_churn.py and test_coordinator.py."""
import asyncio

import pytest
import torch

from node.client import RemoteError, StageClient
from protocol import PROTOCOL_VERSION
from protocol.codec import encode, encode_ints
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.model import lm_loss
from swarm.shards import slots_for
from swarm.trainer import LocalTrainer
from node.inproc import InprocSwarm

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


def reference_gradients(run: RunConfig, corpus, slots=None) -> LocalTrainer:
    """train-local's gradients of step 0, left in .grad, not applied: the mean over `slots` (default:
    every slot, i.e. loss / microbatches per slot; a step that applies fewer keys takes their mean)."""
    ref = LocalTrainer(run, corpus)
    slots = range(run.train.microbatches) if slots is None else slots
    for micro in slots:
        x, y = ref.microbatch("train", 0, micro)
        (lm_loss(ref.model(x), y) / len(slots)).backward()
    return ref


def held_sum(workers, step: int) -> list:
    """Per parameter: the gradients of `step` held by these replicas, summed over them and their keys."""
    total = [None] * len(workers[0].params)
    for worker in workers:
        for key in worker.held(step):
            for i, g in enumerate(worker.grads[key]):
                if g is not None:
                    total[i] = g.clone() if total[i] is None else total[i] + g
    return total


def trainable(module) -> list:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def assert_grads_equal(ref_stage, summed: list, label: str, rtol=1e-4, atol=1e-6) -> None:
    named = trainable(ref_stage)
    assert len(named) == len(summed)
    for (n, p), g in zip(named, summed):
        assert g is not None, f"{label} {n}: no gradient held"
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
    server.next_hop.dht.shutdown()


def outcome_counts(outcome: dict, stage: int) -> dict:
    """peer id -> keys the coordinator's step applied on that replica of `stage` (failed: None)."""
    return {r["peer_id"]: (None if r.get("failed") else r["micro_count"]) for r in outcome["results"]
            if r["stage"] == stage}


async def feed_all_slots(sw: InprocSwarm, step: int) -> list:
    """Every trainer feeds its slots of `step` (the roster deals them); (loss, route) per slot."""
    roster = sw.trainers[0].live_trainers()
    m = sw.run.train.microbatches
    jobs = [t.microbatch(step, s) for t in sw.trainers for s in slots_for(t.peer_id, roster, m)]
    return list(await asyncio.gather(*jobs))


# --- parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec,codec_bwd", [("bf16", ""), ("int8", ""), ("int8ch", ""), ("int4ch", "int8ch"),
                                             ("fp8", "bf16")])
def test_held_gradients_equal_reference(corpus, codec, codec_bwd):
    """Every codec pair crosses the real transport; the gradients every stage holds after the
    step's microbatches sum to the reference's (the 1/microbatches scale is in the loss)."""
    run = tiny_run("parity", codec=codec, codec_bwd=codec_bwd)
    ref = reference_gradients(run, corpus)

    async def go():
        async with InprocSwarm(run, corpus) as sw:
            results = await feed_all_slots(sw, 0)
            return results, [held_sum(stage_workers(sw, k), 0) for k in range(run.model.n_stages)]

    results, sums = asyncio.run(go())
    assert all(r is not None and torch.isfinite(torch.tensor(r[0])) for r in results)
    for k, stage in enumerate(ref.model.stages):
        assert_grads_equal(stage, sums[k], f"stage {k}")


def test_steps_follow_reference(corpus):
    run = tiny_run("steps")
    ref = LocalTrainer(run, corpus)
    ref_losses = [ref.train_step() for _ in range(3)]

    async def go():
        async with InprocSwarm(run, corpus) as sw:
            results = [await sw.trainers[0].train_step(s) for s in range(3)]
            return results, [stage_workers(sw, k)[0] for k in range(run.model.n_stages)]

    results, workers = asyncio.run(go())
    torch.testing.assert_close(torch.tensor([r["loss"] for r in results]), torch.tensor(ref_losses),
                               rtol=1e-5, atol=1e-5)
    assert [r["next_step"] for r in results] == [1, 2, 3]
    assert all(r["outcome"]["applied"] and r["finished"] == 4 for r in results)
    for k, stage in enumerate(ref.model.stages):
        assert workers[k].applied_step == 2
        assert_params_equal(stage, params(workers[k]), f"stage {k}")


def snapshot_held_sums(workers, sums: dict) -> None:
    """Wrap each replica's apply_step: record what it holds (summed) just before the plan is applied."""
    for worker in workers:
        original = worker.apply_step

        def apply_step(plan, peer_id, worker=worker, original=original):
            sums.setdefault(plan.step, {})[id(worker)] = held_sum([worker], plan.step)
            return original(plan, peer_id)
        worker.apply_step = apply_step


def test_two_trainers_sum_to_the_reference_step(corpus):
    """Two trainers deal the 4 slots of the global batch: summed over the replicas of every stage the
    held gradients are train-local's, and the single-replica stages step exactly as train-local."""
    run = tiny_run("two")
    ref = reference_gradients(run, corpus)
    ref_step = LocalTrainer(run, corpus)
    ref_step.train_step()

    async def go():
        async with InprocSwarm(run, corpus, trainers=2) as sw:
            sums = {}
            snapshot_held_sums([w for k in range(run.model.n_stages) for w in stage_workers(sw, k)], sums)
            results = await sw.train_step(0)
            boss = min(sw.trainers, key=lambda t: t.peer_id)
            return results, sums[0], boss.coordinator.closed[0], sw

    results, held, outcome, sw = asyncio.run(go())
    assert sorted(s for r in results for s in r["slots"]) == [0, 1, 2, 3]
    assert all(r["outcome"]["applied"] and r["finished"] == 2 for r in results)
    for k, stage in enumerate(ref.model.stages):
        replicas = [held[id(w)] for w in stage_workers(sw, k)]
        summed = [sum(parts) for parts in zip(*replicas)]
        assert_grads_equal(stage, summed, f"stage {k}")
    for k in range(1, run.model.n_stages):
        assert_params_equal(ref_step.model.stages[k], params(stage_workers(sw, k)[0]), f"stage {k}")
    assert sorted(outcome_counts(outcome, 0).values()) == [2, 2]  # each trainer applied its own keys
    assert [list(outcome_counts(outcome, k).values()) for k in (1, 2)] == [[4], [4]]
    assert outcome["n_total"] == 4 and outcome["dropped"] == 0


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
            await trainer.train_step(0)
            me, peer, tail = trainer.peer_id, sw.servers[1][0].peer_id, sw.servers[2][0].peer_id
            client, stranger = StageClient(trainer.client.p2p, run), StageClient(trainer.client.p2p, run)
            stranger.fingerprint = "0" * 16
            x = encode(torch.zeros(2, 32, run.model.code_width), run.model.wire_codec)
            wide = torch.zeros(2, 32, run.model.d_model)
            errors = {
                "fingerprint": await _refusal(stranger, peer, 1, "forward", x=x),
                "version": await _refusal(client, peer, 1, "forward", x=x, v=PROTOCOL_VERSION + 1),
                "shape": await _refusal(client, peer, 1, "train", **_train_fields(run, me, 1, wide)),
                "state": await _refusal(client, peer, 1, "train", **_train_fields(run, me, 0)),
                "not upstream": await _refusal(client, tail, 2, "train", **_train_fields(run, me, 1)),
            }
            ok, _, _ = await client.call(peer, 1, "forward", x=x, timeout=10)
            return errors, ok, sw.servers[2][0].worker.held(1)

    errors, ok, tail_held = asyncio.run(go())
    assert errors["fingerprint"][0] == "fingerprint" and "another run config" in errors["fingerprint"][1]
    assert errors["version"][0] == "version"
    assert errors["shape"] == ("shape", "shape: last dimension is 64, this boundary carries 4 values per token")
    assert errors["state"][0] == "state"  # step 0 is applied: no late microbatch can change it
    assert errors["not upstream"][0] == "forbidden" and "not a replica of stage 1" in errors["not upstream"][1]
    assert tail_held == []                # the refused call left nothing behind
    assert ok["ok"] and ok["y"]["shape"] == [2, 32, 4]


def test_only_the_runs_trainers_may_drive_training(corpus):
    """The run lists one trainer, not ours: our train and step calls are refused, reading is open."""
    run = tiny_run("authz", trainers=(STRANGER,))

    async def go():
        async with InprocSwarm(run, corpus) as sw:
            trainer, server = sw.trainers[0], sw.servers[1][0]
            client = trainer.client
            errors = {"train": await _refusal(client, server.peer_id, 1, "train",
                                              **_train_fields(run, trainer.peer_id, 0)),
                      "step": await _refusal(client, server.peer_id, 1, "step", plan=b"", group=1)}
            slot = await trainer.microbatch(0, 0)
            info = await client.info(server.peer_id, 1, timeout=10)
            return errors, slot, info, server.worker.applied_step, server.worker.held(0)

    errors, slot, info, applied, held = asyncio.run(go())
    assert errors["train"][0] == "forbidden" and "not one of this run's trainers" in errors["train"][1]
    assert errors["step"][0] == "forbidden" and "not among them" in errors["step"][1]
    assert slot is None                      # the trainer's own route gives up on a refusal
    assert applied == -1 and held == []      # a stranger cannot push the step counter nor hold gradients
    assert info["stage"] == 1                # reading is open
