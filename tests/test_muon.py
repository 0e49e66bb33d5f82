"""Muon (muon.py): the Newton-Schulz orthogonalisation against a direct computation from the
SVD, one Muon step by hand, and the AdamW half against torch's AdamW."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loopgpt import LoopGPT, LoopGPTConfig  # noqa: E402
from muon import NS_COEFFS, MuonAdamW, orthogonalize  # noqa: E402


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
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "muon", muon_lr=0.02)
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
    opt = model.configure_optimizer(0.0, 3e-3, (0.9, 0.95), "muon", muon_lr=0.02)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = first or loss.item()
    assert first > 3.5 and loss.item() < 0.1, (first, loss.item())
