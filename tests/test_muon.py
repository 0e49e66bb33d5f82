"""Muon (loopgpt.MuonAdamW): the Newton-Schulz orthogonalisation against a direct computation from the
SVD, one Muon step by hand, the AdamW half against torch's AdamW, the momentum warmup and
FLT's momentum rule, and the optimizer groups of FLT's recipe."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loopgpt import (NS_COEFFS, LoopGPT, LoopGPTConfig, MuonAdamW, configure_optimizer, muon_momentum,  # noqa: E402
                     orthogonalize)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_newton_schulz_equals_its_polynomial_on_the_singular_values(shape):
    # X <- aX + (bA + cA^2)X with A = XX^T maps U diag(s) V^T to U diag(a s + b s^3 + c s^5) V^T,
    # so 5 steps from G / ||G||_F must equal U diag(p^5(s / ||G||_F)) V^T, computed here in fp64
    torch.manual_seed(0)
    G = torch.randn(*shape) * 3
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    s = S / G.double().norm()
    a, b, c = NS_COEFFS
    for _ in range(5):
        s = a * s + b * s ** 3 + c * s ** 5
    expected = U @ torch.diag(s) @ Vh
    got = orthogonalize(G)
    assert got.shape == G.shape and got.dtype == G.dtype
    torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=1e-3)
    # and it is close to orthogonal: every singular value in Muon's band
    sv = torch.linalg.svdvals(got.double())
    assert sv.min() > 0.6 and sv.max() < 1.25


def test_one_muon_step_by_hand():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 16))  # tall: the update is scaled by sqrt(48 / 16)
    w0 = w.detach().clone()
    g = torch.randn(48, 16)
    opt = MuonAdamW([{"params": [w], "lr": 0.02, "weight_decay": 0.1, "use_muon": True}], momentum=0.95)
    w.grad = g.clone()
    opt.step()
    # first step: momentum = g, Nesterov direction g + 0.95 g; orthogonalisation ignores scale
    expected = w0 * (1 - 0.02 * 0.1) - 0.02 * 3 ** 0.5 * orthogonalize(1.95 * g)
    torch.testing.assert_close(w.detach(), expected)
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 0.1, "use_muon": True}])


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, 4))
    b = torch.nn.Parameter(a.detach().clone())
    mine = MuonAdamW([{"params": [a], "lr": 1e-2, "weight_decay": 0.1}], betas=(0.9, 0.95))
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for step in range(5):
        g = torch.randn(8, 4)
        a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        ref.step()
        torch.testing.assert_close(a.detach(), b.detach())


def test_configure_optimizer_splits_the_parameters():
    cfg = LoopGPTConfig(vocab_size=64, block_size=16, n_embd=32, n_head=2, injection="concat")
    model = LoopGPT(cfg)
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "muon", muon_lr=0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    adam = [names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]]
    assert "adapter.weight" in muon and "core.0.attn.q.weight" in muon and "prelude.0.mlp.fc.weight" in muon
    assert "wte.weight" in adam and "lm_head.weight" in adam
    assert len(muon) + len(adam) == len(list(model.parameters()))
    assert {g["lr"] for g in opt.param_groups if g["use_muon"]} == {0.02}
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"]) for g in opt.param_groups)


def test_muon_overfits_a_batch():
    torch.manual_seed(0)
    cfg = LoopGPTConfig(vocab_size=64, block_size=16, n_embd=32, n_head=2, n_loops=2)
    model = LoopGPT(cfg)
    opt = configure_optimizer(model, 0.0, 3e-3, (0.9, 0.95), "muon", muon_lr=0.02)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = first or loss.item()
    assert first > 3.5 and loss.item() < 0.1, (first, loss.item())


def test_muon_momentum_warms_up_linearly():
    # FLT / nanochat: 0.85 -> 0.95 over the first 300 steps, then 0.95; warmup 0 = 0.95 always
    for step, mu in ((0, 0.85), (150, 0.90), (300, 0.95), (301, 0.95), (5000, 0.95)):
        assert muon_momentum(step, 300) == pytest.approx(mu)
    assert muon_momentum(0, 0) == muon_momentum(10, 0) == 0.95


def test_flt_momentum_rule_gives_the_same_update():
    # FLT's (nanochat's) Muon: buf <- lerp(buf, g, 1 - mu), update from lerp(g, buf, mu). With mu
    # constant that is (1 - mu) times ours, and Newton-Schulz normalises it away (loopgpt.orthogonalize)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 24))
    opt = MuonAdamW([{"params": [w], "lr": 0.02, "use_muon": True}], momentum=0.9)
    buf = torch.zeros(16, 24)
    for _ in range(4):
        g = torch.randn(16, 24)
        buf.lerp_(g, 1 - 0.9)
        expected = w.detach() - 0.02 * orthogonalize(g.lerp(buf, 0.9))
        w.grad = g.clone()
        opt.step()
        torch.testing.assert_close(w.detach(), expected, atol=1e-5, rtol=1e-4)


def _lr_of(opt, model, name):
    p = dict(model.named_parameters())[name]
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def test_flt_recipe_groups():
    # configs/flt_small.py's recipe: wte and lm_head in AdamW groups of their own, every block
    # matrix in Muon's, each group's lr = learning_rate x lr_scale (one schedule drives them all)
    cfg = LoopGPTConfig(vocab_size=64, block_size=16, n_embd=32, n_head=2, n_prelude=0, n_coda=0,
                        injection="full_attn")
    model = LoopGPT(cfg)
    opt = configure_optimizer(model, 0.0, 0.005657, (0.8, 0.95), "muon", muon_lr=0.02,
                                    embedding_lr=0.2828, head_lr=0.005657, eps=1e-10)
    assert _lr_of(opt, model, "wte.weight")["lr"] == pytest.approx(0.2828)
    assert _lr_of(opt, model, "lm_head.weight")["lr"] == pytest.approx(0.005657)
    assert len(_lr_of(opt, model, "wte.weight")["params"]) == len(_lr_of(opt, model, "lm_head.weight")["params"]) == 1
    for name, p in model.named_parameters():
        if name.startswith("core."):
            group = _lr_of(opt, model, name)
            assert group["use_muon"] and group["lr"] == pytest.approx(0.02), name
    adam = [g for g in opt.param_groups if not g["use_muon"]]
    assert all(g["eps"] == 1e-10 and g["betas"] == (0.8, 0.95) and g["weight_decay"] == 0.0 for g in adam)
    assert all(g["lr"] == pytest.approx(0.005657 * g["lr_scale"]) for g in opt.param_groups)
    # unset (0) embedding_lr / head_lr: the groups as before, at learning_rate, eps 1e-8
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "muon")
    assert _lr_of(opt, model, "wte.weight") is _lr_of(opt, model, "lm_head.weight")
    assert _lr_of(opt, model, "wte.weight")["lr"] == 1e-3 and opt.param_groups[0]["eps"] == 1e-8
    # AdamW alone takes the same groups, and eps
    opt = configure_optimizer(model, 0.1, 1e-3, (0.8, 0.95), "adamw", embedding_lr=0.3, head_lr=0.004, eps=1e-10)
    assert isinstance(opt, torch.optim.AdamW) and all(g["eps"] == 1e-10 for g in opt.param_groups)
    assert _lr_of(opt, model, "wte.weight")["lr"] == pytest.approx(0.3)
    assert _lr_of(opt, model, "lm_head.weight")["lr"] == pytest.approx(0.004)
    # tied embeddings: one matrix, the head, at head_lr
    tied = LoopGPT(LoopGPTConfig(**{**cfg.to_dict(), "tie_embeddings": True}))
    opt = configure_optimizer(tied, 0.1, 1e-3, (0.9, 0.95), "muon", embedding_lr=0.3, head_lr=0.004)
    assert _lr_of(opt, tied, "wte.weight")["lr"] == pytest.approx(0.004)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(tied.parameters()))
