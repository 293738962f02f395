import pytest
import torch
from torch import nn

from swarm.config import ConfigError, ModelConfig
from swarm.model import Stage, StagedModel, build_stage, lm_loss


def _zero_boundary_outputs(stage):
    for name in ("sender", "receiver"):
        mod = getattr(stage, name, None)
        for mlp_name in ("enc", "dec"):
            mlp = getattr(mod, mlp_name, None)
            if mlp is not None:
                nn.init.zeros_(mlp[2].weight)


def test_identity_path_with_zeroed_enc_dec(tiny):
    cfg = tiny.replace(codec="fp32")
    model = StagedModel(cfg)
    for s in model.stages:
        _zero_boundary_outputs(s)
    sender, receiver = model.stages[0].sender, model.stages[1].receiver
    h = torch.randn(2, 5, cfg.d_model)
    code = sender(h)
    assert code.shape[-1] == cfg.code_width == 4
    assert torch.equal(code, h[..., :4])
    out = receiver(code)
    expected = torch.zeros_like(h)
    expected[..., :4] = h[..., :4]
    assert torch.equal(out, expected)


def test_gradients_reach_both_sides_of_every_boundary(tiny):
    cfg = tiny.replace(n_stages=4)
    model = StagedModel(cfg)
    x = torch.randint(0, 256, (2, 16))
    lm_loss(model(x), torch.randint(0, 256, (2, 16))).backward()
    for k, stage in enumerate(model.stages):
        for name in ("sender", "receiver"):
            if hasattr(stage, name):
                grads = [p.grad for p in getattr(stage, name).parameters()]
                assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), (k, name)
        assert stage.blocks[0].attn.wqkv.weight.grad.abs().sum() > 0


def test_staged_none_equals_monolithic(tiny):
    cfg = tiny.replace(boundary="none", codec="fp32", n_stages=3, n_layers=4)
    staged = StagedModel(cfg)
    mono = Stage(cfg.replace(n_stages=1), 0)
    # copy weights stage by stage into the single-stage model
    blocks = [b for s in staged.stages for b in s.blocks]
    for src, dst in zip(blocks, mono.blocks):
        dst.load_state_dict(src.state_dict())
    mono.embed.load_state_dict(staged.stages[0].embed.state_dict())
    mono.norm.load_state_dict(staged.stages[-1].norm.state_dict())
    mono.lm_head.load_state_dict(staged.stages[-1].lm_head.state_dict())
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(staged(x), mono(x), rtol=0, atol=0)


@pytest.mark.parametrize("boundary", ["resbm", "bottleneck", "subspace", "none", "int8"])
def test_only_code_width_crosses(tiny, boundary):
    cfg = tiny.replace(boundary=boundary, n_stages=3, n_layers=3)
    model = StagedModel(cfg)
    x = torch.randint(0, 256, (2, 16))
    seen = []
    hooks = [s.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape)) for s in model.stages[1:]]
    model(x)
    for h in hooks:
        h.remove()
    width = cfg.d_model // cfg.ratio if boundary in ("resbm", "bottleneck", "subspace") else cfg.d_model
    assert seen == [torch.Size([2, 16, width])] * 2


def test_subspace_boundary_is_lossless_after_updates(tiny):
    cfg = tiny.replace(boundary="subspace", codec="fp32")
    model = StagedModel(cfg)
    with torch.no_grad():  # perturb as an optimizer would, then re-project
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    for s in model.stages:
        s.project_to_subspace()
    x = torch.randint(0, 256, (2, 16))
    s0, s1 = model.stages
    h = torch.nn.functional.embedding(x, s0.fixed_embedding)
    for blk in s0.blocks:
        h = blk(h, s0.rope_cos, s0.rope_sin)
    rebuilt = s1.receiver(s0.sender(h, x), x)
    torch.testing.assert_close(rebuilt, h, atol=1e-5, rtol=1e-5)


def test_build_stage_matches_staged_model(tiny):
    model = StagedModel(tiny)
    for k in range(tiny.n_stages):
        alone = build_stage(tiny, k)
        for (n, a), (_, b) in zip(model.stages[k].state_dict().items(), alone.state_dict().items()):
            assert torch.equal(a, b), n


@pytest.mark.parametrize("kw, words", [
    (dict(d_model=64, ratio=48), "ratio=48 must divide d_model=64"),
    (dict(d_model=64, ratio=128), "ratio=128 must divide d_model=64"),
    (dict(n_stages=0), "n_stages must be >= 1"),
    (dict(n_stages=5, n_layers=4), "exceeds n_layers=4"),
    (dict(boundary="zip"), "boundary='zip'"),
    (dict(codec="fp6"), "codec='fp6'"),
    (dict(n_heads=3), "n_heads=3"),
    (dict(n_heads=4, kv_heads=3), "kv_heads=3 must divide n_heads=4"),
])
def test_bad_configs_are_clear_errors(kw, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig(**kw)


def test_none_boundary_ignores_ratio():
    assert ModelConfig(d_model=64, ratio=128, boundary="none").code_width == 64


def test_kv_heads_equal_to_heads_is_plain_attention(tiny):
    plain, same = StagedModel(tiny), StagedModel(tiny.replace(kv_heads=tiny.n_heads))
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), same.state_dict().values()))
    assert torch.equal(plain(tokens), same(tokens))


def test_grouped_query_attention_shares_each_kv_head_across_its_group(tiny):
    """GQA with 2 kv heads equals multi-head attention whose k/v heads are each repeated for their group."""
    from swarm.model import Attention, rotary_tables
    gqa_cfg = tiny.replace(kv_heads=2)
    gqa, mha = Attention(gqa_cfg), Attention(tiny)
    hd, h = tiny.d_model // tiny.n_heads, tiny.n_heads
    assert gqa.wqkv.weight.shape == ((h + 2 * 2) * hd, tiny.d_model)  # smaller k and v projections
    q, k, v = gqa.wqkv.weight.detach().split([h * hd, 2 * hd, 2 * hd])
    widen = lambda w: w.view(2, hd, -1).repeat_interleave(h // 2, dim=0).reshape(h * hd, -1)  # noqa: E731
    with torch.no_grad():
        mha.wqkv.weight.copy_(torch.cat([q, widen(k), widen(v)]))
        mha.wo.weight.copy_(gqa.wo.weight)
    x = torch.randn(2, 16, tiny.d_model)
    cos, sin = rotary_tables(tiny)
    assert torch.allclose(gqa(x, cos, sin), mha(x, cos, sin), atol=1e-6)
    loss = lm_loss(StagedModel(gqa_cfg)(torch.randint(0, 256, (2, 16))), torch.randint(0, 256, (2, 16)))
    loss.backward()  # a whole GQA model trains
