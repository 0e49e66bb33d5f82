"""KV sharing across loops (sample.py's SharedKVCache): memory constant in the budget, and exactly the
approximation each option names, checked against the exact cache with its entries overwritten
by hand as the option says (after every forward: a past token's loop-t entry becomes its last
loop's, its loops' mean, or its last loop congruent to t mod N)."""

import pytest
import torch

from configs import parse_kv_sharing
from sample import generate, kv_cache_bytes, new_cache
from test_model import random_model as small_model

SHARINGS = ["last", "mean", "window:2", "first"]


def random_model(**kw):
    model = small_model(**kw)
    with torch.no_grad():  # logits of order 1 (the default head starts near zero), so differences show
        model.lm_head.weight.normal_(std=0.3)
    return model


def decode(model, idx, M, kv_sharing="none", prefill=6, collapse=None):
    """Logits of idx (B, T): the first `prefill` tokens at once, the rest one at a time."""
    cache = new_cache(model, M, kv_sharing)
    out = [model(idx[:, :prefill], loops=M, cache=cache)[0]]
    if collapse:
        collapse(cache, 0, prefill)
    for t in range(prefill, idx.size(1)):
        out.append(model(idx[:, t:t + 1], loops=M, cache=cache)[0])
        if collapse:
            collapse(cache, t, t + 1)
    return torch.cat(out, dim=1), cache


def by_hand(model, M, kind, N):
    """Overwrite the exact cache's core entries of positions lo..hi as `kind` shares them."""
    P, K = model.config.n_prelude, model.config.n_core

    def collapse(cache, lo, hi):
        for store in (cache.k, cache.v):
            core = store[P:P + K * M, :, :, lo:hi].clone().view(M, K, *store.shape[1:3], hi - lo, -1)
            for t in range(M):
                if kind == "last":
                    new = core[M - 1]
                elif kind == "mean":
                    new = core.mean(0)
                else:  # window: the last loop that used slot t mod N
                    new = core[max(s for s in range(M) if s % N == t % N)]
                store[P + K * t:P + K * (t + 1), :, :, lo:hi] = new
    return collapse


@pytest.mark.parametrize("kind", ["last", "mean", "window:2", "window:3"])
@pytest.mark.parametrize("injection", ["none", "add", "full_attn"])
def test_sharing_is_the_exact_cache_with_past_entries_replaced(kind, injection):
    model = random_model(injection=injection)
    idx = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(3))
    M = 5
    name, N = parse_kv_sharing(kind)
    shared, _ = decode(model, idx, M, kind)
    reference, _ = decode(model, idx, M, collapse=by_hand(model, M, name, N))
    torch.testing.assert_close(shared, reference, atol=1e-5, rtol=1e-5)
    exact, _ = decode(model, idx, M)
    full, _ = model(idx, loops=M)
    torch.testing.assert_close(exact, full, atol=1e-5, rtol=1e-5)
    # the prefill is exact; the tokens decoded after it are not (a real approximation). FLT's
    # keys and values barely change from loop to loop (each loop restarts its stream at norm(e),
    # so its first layer's K/V are the same every loop): sharing costs it least
    torch.testing.assert_close(shared[:, :6], full[:, :6], atol=1e-5, rtol=1e-5)
    assert (shared[:, 6:] - full[:, 6:]).abs().max() > (3e-5 if injection == "full_attn" else 1e-3)


@pytest.mark.parametrize("kind", SHARINGS)
def test_one_loop_or_a_wide_window_is_exact(kind):
    model = random_model(injection="add")
    idx = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(decode(model, idx, 1, kind)[0], model(idx, loops=1)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode(model, idx, 3, "window:3")[0], model(idx, loops=3)[0], atol=1e-5, rtol=1e-5)


def test_first_reads_loop_ones_keys_and_values_everywhere():
    # Mixture-of-Recursions: later loops attend to loop 1's K/V, the current tokens' too, so the
    # cache's core slots hold what the exact cache holds in its loop-1 slots, and nothing else
    model = random_model(injection="none")
    idx = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(5))
    P, K, M = 1, 2, 4
    first, cache = decode(model, idx, M, "first")
    _, exact = decode(model, idx, M)
    T = idx.size(1)
    assert not torch.allclose(cache.k[P:P + K, :, :, :T], exact.k[P + K:P + 2 * K, :, :, :T])
    # loop 1 is computed exactly in both, and it is the first loop's slots that are kept
    full = model.new_cache(M)
    model(idx[:, :6], loops=M, cache=full)
    part = new_cache(model, M, "first")
    model(idx[:, :6], loops=M, cache=part)
    torch.testing.assert_close(part.k[P:P + K, :, :, :6], full.k[P:P + K, :, :, :6])
    assert (first - model(idx, loops=M)[0]).abs().max() > 1e-3  # the prefill shares too: not exact


@pytest.mark.parametrize("kind", ["none"] + SHARINGS)
def test_memory_is_measured_and_constant_in_the_budget(kind):
    model = random_model(injection="add")
    idx = torch.randint(0, 61, (2, 8))
    used = {}
    for M in (2, 4, 8):
        _, cache = decode(model, idx, M, kind)
        used[M] = cache.nbytes()
        assert used[M] == kv_cache_bytes(model, 2, M, kv_sharing=kind)
    P, K, C = 1, 2, 1
    per_slot = used[2] // (P + K * (2 if kind in ("none", "window:2") else 1) + C)
    groups = {"none": {2: 2, 4: 4, 8: 8}, "window:2": {2: 2, 4: 2, 8: 2}}.get(kind, {2: 1, 4: 1, 8: 1})
    for M in (2, 4, 8):
        assert used[M] == per_slot * (P + K * groups[M] + C)


def test_bad_sharing_and_what_it_cannot_go_with():
    model = random_model(injection="add")
    prompt = torch.randint(0, 61, (1, 4))
    for bad in ("some", "window:0", "window:x", "last:2"):
        with pytest.raises(ValueError, match="valid: none, first, last, mean, window:N"):
            generate(model, prompt, 2, kv_sharing=bad)
    with pytest.raises(ValueError, match="no exit"):
        generate(model, prompt, 2, kv_sharing="last", exit=("kl", 1e-3))
    with pytest.raises(ValueError, match="routing='mor'"):
        new_cache(random_model(injection="none", routing="mor"), 3, "last")
    out = generate(model, prompt, 5, loops=4, temperature=0, kv_sharing="mean")
    assert out.shape == (1, 9)
