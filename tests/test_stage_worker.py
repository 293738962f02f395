"""One replica's training rules, without a network: one gradient buffer, a step every M microbatches,
a stale forward recomputed, a rerouted microbatch added once."""
import torch

from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.stage_worker import StageWorker

RUN = RunConfig(model=ModelConfig(d_model=32, n_layers=3, n_heads=2, seq_len=8, n_stages=3, ratio=8),
                train=TrainConfig(batch_size=8, microbatches=4))


def code(seed: int) -> torch.Tensor:
    return torch.randn(2, 8, RUN.model.code_width, generator=torch.Generator().manual_seed(seed))


def walk(worker: StageWorker, seed: int, key=None):
    handle, out = worker.begin(code(seed))
    return worker.finish(handle, torch.ones_like(out), key)


def test_gradients_add_into_one_buffer_and_the_replica_steps_every_m():
    w = StageWorker(RUN, 1)
    before = [p.detach().clone() for p in w.params]
    buffers = None
    for i in range(3):
        _, outcome = walk(w, i)
        assert not outcome["stepped"] and outcome["added"]
        ids = [p.grad.data_ptr() for p in w.params]
        assert buffers in (None, ids)           # the same buffers, whatever the count in flight
        buffers = ids
    assert w.accumulated == 3 and w.applied_step == -1
    assert all(torch.equal(a, p) for a, p in zip(before, w.params))
    _, outcome = walk(w, 3)
    assert outcome["stepped"] and w.applied_step == 0 and w.accumulated == 0
    assert all(p.grad is None for p in w.params) and not all(torch.equal(a, p) for a, p in zip(before, w.params))


def test_a_stale_forward_is_recomputed_with_the_current_weights():
    w, fresh = StageWorker(RUN, 1), StageWorker(RUN, 1)
    handle, _ = w.begin(code(99))                  # in flight while the replica steps
    for i in range(4):
        walk(w, i)
    fresh.load_state_dict(w.state_dict())
    grad_in, outcome = w.finish(handle, torch.ones(2, 8, RUN.model.code_width))
    want, _ = walk(fresh, 99)
    assert outcome["staleness"] == 1 and w.recomputed == 1
    torch.testing.assert_close(grad_in, want)     # as if the forward had run after the step
    torch.testing.assert_close([p.grad for p in w.params], [p.grad for p in fresh.params])


def test_changed_weights_make_graphs_in_flight_stale_without_counting_an_update():
    w = StageWorker(RUN, 1)
    handle, _ = w.begin(code(5))
    w.change_weights(lambda params: [p.mul_(0.5) for p in params])
    _, outcome = w.finish(handle, torch.ones(2, 8, RUN.model.code_width))
    assert outcome["staleness"] == 0 and w.recomputed == 1


def test_a_rerouted_microbatch_is_answered_but_added_once():
    w = StageWorker(RUN, 2)                        # the tail: loss and backward in one call
    targets = torch.zeros(2, 8, dtype=torch.long)
    loss1, g1, first = w.loss_step(code(1), targets, key=("Qa", 0, 1))
    grads = [p.grad.clone() for p in w.params]
    loss2, g2, again = w.loss_step(code(1), targets, key=("Qa", 0, 1))
    assert first["added"] and not again["added"] and w.duplicates == 1 and w.accumulated == 1
    assert loss1 == loss2 and torch.equal(g1, g2)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, w.params))
    _, _, other = w.loss_step(code(1), targets, key=("Qb", 0, 1))   # another owner's key is its own
    assert other["added"] and w.accumulated == 2


def test_at_most_a_steps_worth_of_graphs_is_held_and_dropped_ones_are_recomputed():
    w, ref = StageWorker(RUN, 1), StageWorker(RUN, 1)
    handles = [w.begin(code(i))[0] for i in range(6)]          # 6 in flight, 4 microbatches per step
    assert [h.leaf is not None for h in handles] == [False, False, True, True, True, True]
    grad_in, outcome = w.finish(handles[0], torch.ones(2, 8, RUN.model.code_width))
    want, _ = walk(ref, 0)
    assert w.recomputed == 1 and outcome["staleness"] == 0
    torch.testing.assert_close(grad_in, want)                  # same weights: the recompute is exact
    del handles[2]                                             # a caller that gave up: its graph goes with it
    new, _ = w.begin(code(9))                                  # and frees its place, no one else's graph
    assert all(h.leaf is not None for h in handles[2:] + [new])
