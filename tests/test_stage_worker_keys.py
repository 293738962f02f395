"""A stage holds gradients per microbatch key and applies exactly the keys its step's plan lists."""
import pytest
import torch

from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.ledger import MicroKey, TrainerLedger, merge_ledgers
from swarm.stage_worker import StageWorker, StaleRequest

S = 3          # stages: 0 = the trainers, 1 = "me" (middle), 2 = the tail
ME = "me"


def _run() -> RunConfig:
    model = ModelConfig(d_model=64, n_layers=3, n_heads=2, seq_len=16, n_stages=S, ratio=16)
    return RunConfig(model=model, train=TrainConfig(batch_size=8, microbatches=4), run_id="keys")


def _code(run, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(run.train.microbatch_size, run.model.seq_len, run.model.code_width, generator=g)


def _push(worker: StageWorker, key: MicroKey, seed: int) -> torch.Tensor:
    """One microbatch through a middle stage: begin, then finish with a fixed output gradient."""
    handle, y = worker.begin(key, _code(worker.run, seed), None)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1000))
    return worker.finish(key, handle, grad_out)


def _plan(step: int, routes: dict, live):
    """routes: owner -> {micro: route}; the plan the coordinator would merge from those ledgers."""
    ledgers = []
    for owner, micros in routes.items():
        ledger = TrainerLedger(owner, step, S)
        for micro, route in micros.items():
            ledger.record(micro, route)
        ledgers.append(ledger)
    return merge_ledgers(step, ledgers, live, S)


def _capture_optimizer(worker: StageWorker) -> list:
    """Replace the optimizer step: record the gradient it would step with (parameter order)."""
    seen = []

    def step(step_index: int) -> float:
        seen.append([None if p.grad is None else p.grad.clone() for p in worker.params])
        return 1.0
    worker.opt.step = step
    return seen


def _manual_sum(grads: dict, keys, scale: float) -> list:
    out = []
    for i in range(len(next(iter(grads.values())))):
        parts = [grads[k][i] for k in keys if grads[k][i] is not None]
        out.append(torch.stack(parts).sum(0) * scale if parts else None)
    return out


def _assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=0, atol=0)


A0, B1, C2, D3 = MicroKey("A", 0, 0), MicroKey("B", 0, 1), MicroKey("C", 0, 2), MicroKey("D", 0, 3)
# A0 and B1 went through this replica; C2 was rerouted to "other" after passing here (the
# plan applies it there); D3 belongs to a trainer that died before the barrier.
ROUTES = {"A": {0: ("A", ME, "t")}, "B": {1: ("B", ME, "t")}, "C": {2: ("C", "other", "t")},
          "D": {3: ("D", ME, "t")}}


@pytest.fixture
def worker():
    torch.manual_seed(0)
    w = StageWorker(_run(), 1)
    for seed, key in enumerate((A0, B1, C2, D3)):
        _push(w, key, seed)
    return w


def test_keys_are_held_apart_until_the_step(worker):
    assert worker.held(0) == [A0, B1, C2, D3]
    assert worker.held(1) == []
    assert all(p.grad is None for p in worker.params)  # nothing summed on arrival
    a, b = worker.grads[A0], worker.grads[B1]
    assert any(ga is not None and not torch.equal(ga, gb) for ga, gb in zip(a, b))


def test_apply_sums_exactly_the_listed_keys_and_discards_the_rest(worker):
    plan = _plan(0, ROUTES, live={"A", "B", "C"})
    assert plan.n_total == 3 and plan.keys_for(1, ME) == (A0, B1)
    expected = _manual_sum(worker.grads, (A0, B1), worker.run.train.microbatches / plan.n_total)
    seen = _capture_optimizer(worker)
    result = worker.apply_step(plan, ME)
    assert result == {"applied": True, "grad_norm": 1.0, "micro_count": 2, "duplicate": False, "missing": 0}
    assert len(seen) == 1
    _assert_same(seen[0], expected)
    assert worker.held(0) == [] and worker.grads == {}
    assert worker.discarded == 2                     # C2 (applied elsewhere) and D3 (owner gone)
    assert worker.applied_step == 0 and worker.plan == plan
    assert all(p.grad is None for p in worker.params)


def test_apply_is_idempotent(worker):
    plan = _plan(0, ROUTES, live={"A", "B", "C"})
    first = worker.apply_step(plan, ME)
    params = [p.detach().clone() for p in worker.params]
    again = worker.apply_step(plan, ME)
    assert first["applied"] and first["micro_count"] == 2
    assert again == {"applied": False, "grad_norm": 0.0, "micro_count": 0, "duplicate": True, "missing": 0}
    assert all(torch.equal(a, p) for a, p in zip(params, worker.params))


def test_keys_of_applied_steps_are_refused(worker):
    worker.apply_step(_plan(0, ROUTES, live={"A", "B", "C"}), ME)
    late = MicroKey("A", 0, 1)
    with pytest.raises(StaleRequest, match="already applied"):
        worker.begin(late, _code(worker.run, 9), None)
    handle, _ = worker.begin(MicroKey("A", 1, 0), _code(worker.run, 9), None)
    with pytest.raises(StaleRequest):
        worker.finish(late, handle, torch.zeros(1))
    _push(worker, MicroKey("A", 1, 0), 9)            # the next step is open
    assert worker.held(1) == [MicroKey("A", 1, 0)]


def test_a_retried_key_replaces_its_earlier_gradient():
    torch.manual_seed(0)
    w = StageWorker(_run(), 1)
    _push(w, A0, seed=1)
    first = [g.clone() if g is not None else None for g in w.grads[A0]]
    _push(w, A0, seed=2)                             # the same key again (a reroute after the first attempt)
    _push(w, B1, seed=2)                             # the same input under another key: the reference
    assert w.held(0) == [A0, B1]
    assert all(torch.equal(a, b) for a, b in zip(w.grads[A0], w.grads[B1]) if a is not None)
    assert any(a is not None and not torch.equal(a, f) for a, f in zip(w.grads[A0], first))
    retry = [g.clone() if g is not None else None for g in w.grads[A0]]
    seen = _capture_optimizer(w)
    w.apply_step(_plan(0, {"A": {0: ("A", ME, "t")}}, live={"A"}), ME)
    # the retry's gradient alone, not both attempts summed
    _assert_same(seen[0], _manual_sum({A0: retry}, (A0,), w.run.train.microbatches / 1))


def test_last_stage_holds_the_loss_gradient_under_its_key():
    run = _run()
    torch.manual_seed(0)
    tail = StageWorker(run, S - 1)
    x = _code(run, 3)
    targets = torch.randint(0, run.model.vocab_size, x.shape[:2], generator=torch.Generator().manual_seed(4))
    loss, grad_in = tail.loss_and_hold(A0, x, targets)
    assert tail.held(0) == [A0] and grad_in.shape == x.shape
    # the held gradient is d(loss / microbatches): the reference's scaling per microbatch
    from swarm.model import lm_loss
    leaf = x.clone().requires_grad_(True)
    ref = lm_loss(tail.stage(leaf, None).float(), targets)
    (ref / run.train.microbatches).backward()
    assert loss == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad_in, leaf.grad)
    for held, p in zip(tail.grads[A0], tail.params):
        torch.testing.assert_close(held, p.grad)
    plan = _plan(0, {"A": {0: ("A", "m", ME)}}, live={"A"})
    assert tail.apply_step(plan, ME)["micro_count"] == 1 and tail.held(0) == []
    with pytest.raises(StaleRequest):
        tail.loss_and_hold(MicroKey("A", 0, 1), x, targets)
