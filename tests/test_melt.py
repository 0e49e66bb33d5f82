"""MELT (Memory-Efficient Looped Transformer, arXiv 2605.07721): the gated per-layer latent, its
one-slot-per-layer cache, chunk-wise training; each checked against the plain model where the
equations say they meet, and cached decoding against MELT's own forward."""

import pytest
import torch
import torch.nn.functional as F

from loopgpt import LoopGPT, LoopGPTConfig, MeltCache, init_from_source
from sample import generate, kv_cache_bytes, new_cache
from train import Objective
from test_kv_sharing import decode, random_model


def melt_model(seed=0, chunk=4, **kw):
    model = random_model(injection="add", melt=True, melt_chunk=chunk, **kw)
    with torch.no_grad():  # a gate that depends on its inputs
        for block in model.core:
            block.melt_gate.weight.normal_(std=0.3)
            block.melt_gate.bias.normal_()
    return model


IDX = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(7))


def test_the_gate_and_the_latent_by_hand():
    model = melt_model()
    block = model.core[0]
    rope = (model.rope_cos[:12], model.rope_sin[:12])
    x1, x2 = torch.randn(2, 12, 32), torch.randn(2, 12, 32)
    cache, slot = MeltCache(model.config, 2), model.config.n_prelude  # core layer 0 at loop 1
    with torch.no_grad():
        y1 = block(x1, rope, cache, slot)
        torch.testing.assert_close(cache.latents[0], block.norm_1(x1))  # h_0 = x_1: one loop is the plain block
        plain = LoopGPT(model.config.__class__(**{**model.config.to_dict(), "melt": False})).core[0]
        plain.load_state_dict(block.state_dict(), strict=False)
        torch.testing.assert_close(y1, plain(x1, rope))
        h1 = cache.latents[0]
        block(x2, rope, cache, slot + model.config.n_core)  # loop 2
        xn = block.norm_1(x2)
        z = torch.sigmoid(torch.cat([xn, h1], -1) @ block.melt_gate.weight.T + block.melt_gate.bias)
        torch.testing.assert_close(cache.latents[0], z * h1 + (1 - z) * xn)
        assert 0.05 < z.std()  # per token and channel


def test_one_loop_is_the_plain_model_and_a_closed_gate_is_last_sharing():
    melt = melt_model(chunk=1)
    plain = random_model(injection="add")
    plain.load_state_dict(melt.state_dict(), strict=False)
    torch.testing.assert_close(melt(IDX, loops=1)[0], plain(IDX, loops=1)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(melt(IDX, loops=3)[0], plain(IDX, loops=3)[0], atol=1e-3)
    with torch.no_grad():  # z = 0: the latent is this loop's input, K/V the plain model's
        for block in melt.core:
            block.melt_gate.bias.fill_(-1e4)
    # chunk 1 is token-by-token decoding, here through the plain model's 'last'-shared cache
    torch.testing.assert_close(melt(IDX, loops=3)[0], decode(plain, IDX, 3, "last", prefill=1)[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("M", [1, 3, 6])
def test_cached_decoding_equals_melts_own_forward(chunk, M):
    model = melt_model(chunk=chunk)
    full, _ = model(IDX, loops=M)
    cache = model.new_cache(M)
    out = [model(IDX[:, :4], loops=M, cache=cache)[0]]  # a prefill of one chunk (or 4 of 1)
    out += [model(IDX[:, s:s + chunk], loops=M, cache=cache)[0] for s in range(4, 12, chunk)]
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)
    if chunk == 1:
        gen = model.generate(IDX[:, :5], 6, loops=M, temperature=0)
        ref = IDX[:, :5]
        for _ in range(6):  # greedy by the full forward
            ref = torch.cat([ref, model(ref, loops=M)[0][:, -1:].argmax(-1)], 1)
        assert torch.equal(gen, ref)


def test_memory_is_one_slot_per_layer_whatever_the_budget():
    model = melt_model()
    used = {}
    for M in (1, 4, 8):
        cache = model.new_cache(M)
        model(IDX, loops=M, cache=cache)
        used[M] = cache.nbytes()
        assert used[M] == kv_cache_bytes(model, 2, M)  # what sample.py reports
    assert used[1] == used[4] == used[8] == 2 * 4 * 2 * 2 * 24 * 8 * 4  # K and V, 4 slots, B=2, 2 kv heads of 8, 24 positions
    assert model.num_params() - random_model(injection="add").num_params() == 2 * (2 * 32 * 32 + 32)


def test_training_reaches_earlier_chunks_through_their_shared_keys_and_values():
    model = melt_model(chunk=4).train()
    idx = torch.arange(12).view(1, 12) % 61
    y = torch.full((1, 12), -1)
    y[0, -1] = 5  # a loss on the last position only, in the third chunk
    _, loss = model(idx, targets=y, loops=3)
    loss.backward()
    grad = model.wte.weight.grad
    assert grad[0:4].abs().sum(1).min() > 0  # every token of the first chunk gets a gradient
    assert model.core[0].melt_gate.weight.grad.abs().sum() > 0


def test_a_looped_checkpoint_converts_to_melt_as_it_is():
    source = random_model(injection="add")
    target = LoopGPT(LoopGPTConfig(**{**source.config.to_dict(), "melt": True})).eval()
    assert init_from_source(target, source) == {}
    for name, p in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], p)
    # at init z ≈ 0.02: the converted model is the source with 'last' sharing, nearly
    diff = (target(IDX, loops=3)[0] - decode(source, IDX, 3, "last", prefill=16)[0]).abs().max()
    assert diff < 0.1 * (source(IDX, loops=3)[0] - decode(source, IDX, 3, "first", prefill=16)[0]).abs().max()


def test_what_melt_cannot_go_with():
    with pytest.raises(ValueError, match="melt=True"):
        LoopGPTConfig(melt=True, injection="full_attn")
    model = melt_model()
    with pytest.raises(ValueError, match="its own shared cache"):
        new_cache(model, 3, "mean")
    with pytest.raises(ValueError, match="no exit"):
        generate(model, IDX[:, :3], 2, exit=("kl", 1e-3))


def test_phase_one_at_alpha_zero_is_the_looped_model_itself():
    # α = 0: every attention reads the plain loop's own K/V (past chunks' at this loop, too)
    melt = melt_model(chunk=4).train()
    plain = random_model(injection="add")
    plain.load_state_dict(melt.state_dict(), strict=False)
    melt.melt_alpha = 0.0
    for M in (1, 3, 5):
        torch.testing.assert_close(melt(IDX, loops=M)[0], plain(IDX, loops=M)[0], atol=1e-5, rtol=1e-5)
    melt.melt_alpha = 0.5  # in between: neither
    assert not torch.allclose(melt(IDX, loops=3)[0], plain(IDX, loops=3)[0], atol=1e-3)
    melt.melt_alpha = 1.0
    with pytest.raises(ValueError, match="training mode"):
        melt.melt_alpha = 0.5
        melt.generate(IDX[:, :3], 2, loops=3)


def distill(student, teacher, lambda_attn=0.1):
    """train.py's MELT phase-2 loss at 3 loops."""
    return Objective(student, teacher=teacher, lambda_attn=lambda_attn)(IDX, loops=3, distill=True)


def test_distillation_loss_by_hand():
    teacher = random_model(injection="add").requires_grad_(False)
    student = melt_model(chunk=4).train()
    student.load_state_dict(teacher.state_dict(), strict=False)
    student.melt_alpha = 0.0  # the student computes what the teacher does: nothing to distill
    assert distill(student, teacher).item() == pytest.approx(0.0, abs=1e-6)
    student.melt_alpha = 1.0
    kd = distill(student, teacher, lambda_attn=0.0)
    p_t = F.softmax(teacher(IDX, loops=3)[0], -1)
    log_s = F.log_softmax(student(IDX, loops=3)[0], -1)
    torch.testing.assert_close(kd, (p_t * (p_t.log() - log_s)).sum(-1).mean(), atol=1e-6, rtol=1e-5)
    loss = distill(student, teacher)
    assert loss > kd > 0
    loss.backward()
    assert student.core[0].melt_gate.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(m._forward_hooks for m in (*student.modules(), *teacher.modules()))  # hooks removed


def test_train_melt_post_training_end_to_end(tmp_path):
    from test_train import SMALL, records, run
    d = tmp_path / "data"  # (train.py prepares the built-in corpus there)
    run("train.py", f"--data_dir={d}", f"--out_dir={tmp_path / 'src'}", "--max_iters=4", "--eval_interval=4", *SMALL,
        "--n_loops=3")
    common = [f"--data_dir={d}", f"--init_from={tmp_path / 'src'}", "--melt=True", "--max_iters=4",
              "--eval_interval=4", *SMALL, "--n_loops=3"]
    p = run("train.py", *common, "--melt_transition=2", "--melt_distill=True", f"--out_dir={tmp_path / 'melt'}")
    assert "copied; new parameters keep their init: melt_gate" in p.stdout and "melt=True" in p.stdout
    assert [e["step"] for e in records(tmp_path / "melt", "eval")] == [0, 4]
    for bad, message in ((["--melt=False", "--melt_distill=True"], "it needs melt=True"),
                         (["--init_from=", "--melt_distill=True"], "give its --init_from")):
        p = run("train.py", *common, *bad, f"--out_dir={tmp_path / 'bad'}", ok=False)
        assert message in p.stderr
