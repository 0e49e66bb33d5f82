"""The head + soft-cap + cross-entropy computed a chunk of rows at a time (loopgpt.ChunkedHeadLoss,
train.py's loss_chunk): by hand, and against the whole-logits loss it replaces, loss and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from configs import TrainConfig
from loopgpt import LoopGPT, LoopGPTConfig
from train import Objective


def model_with_head(seed=0, **kw):
    """A small looped model whose head is not near zero (logits of scale ~5: the soft-cap bends them)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=61, block_size=24, n_embd=32, n_head=4, n_prelude=1, n_core=1, n_coda=1, n_loops=2)
    model = LoopGPT(LoopGPTConfig(**{**cfg, **kw}))
    with torch.no_grad():
        model.lm_head.weight.normal_(std=1.0)
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):  # the blocks act, so the trunk's gradients are not trivial
                p.normal_(std=0.1)
    return model


def whole_loss(model, h, y):
    """What the loss was before chunking: the (N, V) logits, then F.cross_entropy."""
    logits = model.logits(h)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)


@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_chunked_loss_by_hand(softcap):
    # V = 3, d = 2: logits rows z = c tanh(hW^T / c); targets 0, 2 and one ignored row
    model = LoopGPT(LoopGPTConfig(vocab_size=3, block_size=4, n_embd=2, n_head=1, n_loops=1, softcap=softcap))
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 2, -1])
    cap = (lambda v: softcap * math.tanh(v / softcap)) if softcap else (lambda v: v)
    d_cap = 1 - math.tanh(1 / softcap) ** 2 if softcap else 1.0  # dz/d raw at raw = 1 (0 at raw = 0 is 1)
    a = cap(1.0)  # z = [a, 0, 0] for row 0, [0, a, 0] for row 1
    lse = math.log(math.exp(a) + 2)
    expected = ((lse - a) + (lse - 0.0)) / 2  # mean over the two counted rows
    loss = model.chunked_loss(h, y, rows=2)  # chunks: rows 0-1, row 2 (all ignored)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    p_big, p_small = math.exp(a) / (math.exp(a) + 2), 1 / (math.exp(a) + 2)
    g0 = [(p_big - 1) * d_cap / 2, p_small / 2, p_small / 2]  # dloss/d raw logits, row 0 (target 0)
    g1 = [p_small / 2, p_big * d_cap / 2, (p_small - 1) / 2]  # row 1 (target 2)
    # grad_h = g W (W's third row is 0), grad_W = Σ_i g_i^T h_i
    torch.testing.assert_close(h.grad, torch.tensor([[g0[0], g0[1]], [g1[0], g1[1]], [0.0, 0.0]]))
    torch.testing.assert_close(model.lm_head.weight.grad, torch.tensor([[g0[0], g1[0]], [g0[1], g1[1]],
                                                                        [g0[2], g1[2]]]))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 15.0, 2.0])
def test_chunked_loss_equals_the_whole_logits_loss(tie, softcap):
    # h and the head alone, every chunking: rows 1 (one row a chunk), 5 and 16 (not dividing 21),
    # 21 and 100 (one chunk); rows 0-4 ignored, so with rows=5 the first chunk has no target
    model = model_with_head(tie_embeddings=tie, softcap=softcap)
    h = torch.randn(3, 7, 32, requires_grad=True)
    y = torch.randint(0, 61, (3, 7))
    y[0, :5] = -1
    y[2, 3] = -1
    ref = whole_loss(model, h, y)
    ref_h, ref_w = torch.autograd.grad(ref, (h, model.lm_head.weight))
    for rows in (1, 5, 16, 21, 100):
        loss = model.chunked_loss(h, y, rows)
        grad_h, grad_w = torch.autograd.grad(loss, (h, model.lm_head.weight))
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(grad_h, ref_h)
        torch.testing.assert_close(grad_w, ref_w)
    with pytest.raises(ValueError, match="rows per chunk"):
        model.chunked_loss(h, y, 0)


@pytest.mark.parametrize("tie", [False, True])
def test_objective_with_loss_chunk_gives_the_same_loss_and_gradients(tie):
    # train.py's Objective end to end: every parameter's gradient (tied: the embedding's and the
    # head's on one matrix) as with the whole logits; a micro-batch no larger than loss_chunk
    # keeps the whole-logits path, bit for bit
    model = model_with_head(tie_embeddings=tie)
    x, y = torch.randint(0, 61, (3, 8)), torch.randint(0, 61, (3, 8))
    y[1] = -1  # a whole row without targets

    def loss_and_grads(loss_chunk):
        model.zero_grad()
        loss = Objective(model, loss_chunk=loss_chunk)(x, y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref, ref_grads = loss_and_grads(0)
    for loss_chunk in (5, 8, 23):
        loss, grads = loss_and_grads(loss_chunk)
        torch.testing.assert_close(loss, ref)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    loss, grads = loss_and_grads(24)  # 24 rows: one chunk, so the old path
    assert torch.equal(loss, ref) and all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def test_chunked_loss_under_bf16_autocast_runs_the_head_in_bf16():
    # as lm_head under autocast: the matmul in bf16, the rest in fp32; the whole path's loss to
    # fp32 round-off, while an fp32 head would differ by bf16's rounding (~1e-3)
    model = model_with_head(softcap=15.0)
    h = torch.randn(4, 6, 32, requires_grad=True)
    y = torch.randint(0, 61, (4, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, loss = whole_loss(model, h, y), model.chunked_loss(h, y, 7)
    fp32 = whole_loss(model, h, y)
    assert loss.dtype == torch.float32
    assert (ref - loss).abs() < 1e-5 < (ref - fp32).abs()
    ref_h, ref_w = torch.autograd.grad(ref, (h, model.lm_head.weight))
    grad_h, grad_w = torch.autograd.grad(loss, (h, model.lm_head.weight))
    fp32_w = torch.autograd.grad(fp32, model.lm_head.weight)[0]
    assert grad_h.dtype == grad_w.dtype == torch.float32
    torch.testing.assert_close(grad_h, ref_h, atol=1e-6, rtol=1e-5)  # g W in bf16, as lm_head's backward
    # grad_W: the whole path rounds g^T h to bf16 once, the chunks add bf16 partial products in
    # fp32: both within bf16's precision of the fp32 gradient, neither equal to the other
    for w in (ref_w, grad_w):
        torch.testing.assert_close(w, fp32_w, atol=1e-2 * fp32_w.abs().max().item(), rtol=0)


def test_loss_chunk_setting_is_checked():
    assert TrainConfig().loss_chunk == 8192
    with pytest.raises(ValueError, match="loss_chunk must be >= 0"):
        TrainConfig(loss_chunk=-1)
