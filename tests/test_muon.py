"""Muon (loopgpt.MuonAdamW): the Newton-Schulz orthogonalisation against a direct computation from the
SVD, one Muon step by hand, the AdamW half against torch's AdamW, the momentum warmup and
FLT's momentum rule, the optimizer groups of FLT's recipe, the batched step against one matrix
at a time, and the step split across two torchrun processes (gloo) against one process.
Run as a script (by torchrun), this file is that test's worker."""

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


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_orthogonalize_a_batch_is_each_matrix_on_its_own(shape):
    # each matrix normalised by its own norm: a batch of very different scales, one of them
    # zero (the padding of a rank's share: it must stay zero), and two leading dimensions
    torch.manual_seed(0)
    G = torch.randn(2, 3, *shape) * torch.tensor([1e-3, 1.0, 1e3]).view(1, 3, 1, 1)
    G[1, 2] = 0
    got = orthogonalize(G)
    assert got.shape == G.shape
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(got[i, j], orthogonalize(G[i, j]), rtol=1e-6, atol=1e-7)
    assert not got[1, 2].any()


# shapes (tall, wide, square, several of a shape, one alone) in two Muon groups of different lr and
# weight decay, an AdamW group, and a matrix that gets no gradient
MIXED = [[(24, 40), (24, 40), (24, 40), (40, 24), (32, 32), (32, 32), (16, 48)],
         [(24, 40), (24, 40), (40, 24)],
         [(8, 4)]]
NO_GRAD = (0, 5)  # group 0's sixth matrix: its grad stays None


def mixed_params(batched=None):
    """MIXED's parameters (seeded) and a MuonAdamW over them."""
    torch.manual_seed(0)
    params = [[torch.nn.Parameter(torch.randn(*s)) for s in shapes] for shapes in MIXED]
    opt = MuonAdamW([{"params": params[0], "lr": 0.02, "weight_decay": 0.1, "use_muon": True},
                     {"params": params[1], "lr": 0.01, "weight_decay": 0.0, "use_muon": True},
                     {"params": params[2], "lr": 1e-2, "weight_decay": 0.1}], batched=batched)
    return params, opt


def mixed_steps(params, opt, steps):
    """Muon steps with seeded gradients and the momentum warming up, as train.py sets it."""
    for step in steps:
        g = torch.Generator().manual_seed(step)
        for i, group in enumerate(params):
            for j, p in enumerate(group):
                p.grad = None if (i, j) == NO_GRAD else torch.randn(p.shape, generator=g)
        for group in opt.param_groups:
            group["momentum"] = muon_momentum(step, 3)


def per_matrix_muon(params, steps):
    """The Muon rule one matrix at a time, written out (as MuonAdamW ran before batching)."""
    bufs = {}
    for step in steps:
        g = torch.Generator().manual_seed(step)
        mu = muon_momentum(step, 3)
        for i, (lr, wd) in enumerate([(0.02, 0.1), (0.01, 0.0)]):
            for j, p in enumerate(params[i]):
                if (i, j) == NO_GRAD:
                    continue
                grad = torch.randn(p.shape, generator=g)
                buf = bufs.setdefault((i, j), torch.zeros_like(p))
                buf.mul_(mu).add_(grad)
                p.mul_(1 - lr * wd)
                p.add_(orthogonalize(grad.add(buf, alpha=mu)), alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)


def test_batched_muon_equals_one_matrix_at_a_time():
    params, opt = mixed_params(batched=True)  # as on a GPU: each shape's matrices in one batch
    ref = [[p.detach().clone() for p in group] for group in params[:2]]
    start = [p.detach().clone() for p in params[2]]
    for step in range(4):
        mixed_steps(params, opt, [step])
        opt.step()
    per_matrix_muon(ref, range(4))
    for group, expected in zip(params, ref):
        for p, e in zip(group, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-6)
    assert not opt.state[params[0][5]] and torch.equal(params[0][5].detach(), ref[0][5])  # no grad: untouched
    assert not torch.equal(params[2][0].detach(), start[0])  # the AdamW group stepped too
    # on a CPU the default orthogonalises one matrix at a time: the old step's numbers, bit for bit
    again, opt = mixed_params()
    for step in range(4):
        mixed_steps(again, opt, [step])
        opt.step()
    for group, expected in zip(again, ref):
        for p, e in zip(group, expected):
            assert torch.equal(p.detach(), e)


def test_muon_resumes_from_its_state_dict_exactly():
    straight, opt = mixed_params()
    for step in range(6):
        mixed_steps(straight, opt, [step])
        opt.step()
    split, opt = mixed_params()
    for step in range(3):
        mixed_steps(split, opt, [step])
        opt.step()
    state = opt.state_dict()
    # a fresh optimizer over copies of the parameters, loaded mid-run (as a resumed train.py)
    copies, opt = mixed_params()
    with torch.no_grad():
        for group, saved in zip(copies, split):
            for p, q in zip(group, saved):
                p.copy_(q)
    opt.load_state_dict(state)
    for step in range(3, 6):
        mixed_steps(copies, opt, [step])
        opt.step()
    for group, other in zip(straight, copies):
        for p, q in zip(group, other):
            assert torch.equal(p, q)


def test_muon_split_across_two_processes_equals_one(tmp_path):
    # every rank orthogonalises its share of each shape's batch, the rest comes by all-gather:
    # both ranks must end with the parameters of one process doing it all
    from test_train import ROOT, run  # torchrun as test_train's comparisons run it
    run("torchrun", cmd=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         os.path.join(ROOT, "tests", "test_muon.py"), str(tmp_path)])
    params, opt = mixed_params(batched=True)
    for step in range(3):
        mixed_steps(params, opt, [step])
        opt.step()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for group, saved in zip(params, got["params"]):
            for p, q in zip(group, saved):
                torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-6)
        # the batches each rank orthogonalised, a step: its half of every shape group, rounded up
        # (group 0: 3 wide, 1 tall, 1 square with a gradient, 1 16x48; group 1: 2 wide, 1 tall)
        assert got["batches"] == [2, 1, 1, 1, 1, 1] * 3, got["batches"]


def ddp_worker(out_dir):
    """test_muon_split_across_two_processes_equals_one's processes: 3 steps, each rank's params saved."""
    import torch.distributed as dist
    import loopgpt
    dist.init_process_group("gloo")
    batches, plain = [], loopgpt.orthogonalize

    def counted(G, steps=5):
        batches.append(G.size(0))
        return plain(G, steps)
    loopgpt.orthogonalize = counted
    params, opt = mixed_params(batched=True)
    for step in range(3):
        mixed_steps(params, opt, [step])
        opt.step()
    torch.save({"params": [[p.detach() for p in group] for group in params], "batches": batches},
               os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    ddp_worker(sys.argv[1])
