"""MELT (Memory-Efficient Looped Transformer, arXiv 2605.07721): the gated per-layer latent, its
one-slot-per-layer cache, chunk-wise training; each checked against the plain model where the
equations say they meet, and cached decoding against MELT's own forward."""

import pytest
import torch

from loopgpt import LoopGPT, LoopGPTConfig, init_from_source
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
    store = [None, None]
    with torch.no_grad():
        y1 = block(x1, rope, latent=(store, 0))
        torch.testing.assert_close(store[0], block.norm_1(x1))  # h_0 = x_1: one loop is the plain block
        plain = LoopGPT(model.config.__class__(**{**model.config.to_dict(), "melt": False})).core[0]
        plain.load_state_dict(block.state_dict(), strict=False)
        torch.testing.assert_close(y1, plain(x1, rope))
        h1 = store[0]
        block(x2, rope, latent=(store, 0))
        xn = block.norm_1(x2)
        z = torch.sigmoid(torch.cat([xn, h1], -1) @ block.melt_gate.weight.T + block.melt_gate.bias)
        torch.testing.assert_close(store[0], z * h1 + (1 - z) * xn)
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
        model.new_cache(3, "mean")
    with pytest.raises(ValueError, match="no exit"):
        model.generate(IDX[:, :3], 2, exit=("kl", 1e-3))
