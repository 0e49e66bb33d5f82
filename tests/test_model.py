"""Model tests: the block against a hand-written reference, weight sharing, the loop, KV cache."""

import cmath
import math

import pytest
import torch
import torch.nn.functional as F

from loopgpt import (INJECTIONS, KeyMask, LoopGPT, LoopGPTConfig, apply_rotary, configure_optimizer, flops_per_token,
                     norm, rotary_table, summary)
from sample import StaticKVCache, decode_with_exit, generate
from train import Objective, residual_rms, sample_short_route

OBJECTIVE_KEYS = ("lambda_short", "lambda_cons", "gate_stage", "gate_beta", "gate_k", "gate_gamma", "lambda_mono",
                  "lambda_router")


def loss_of(model, x, y, **kw):
    """train.py's training loss: Objective's settings from kw, the rest per call."""
    settings = {k: kw.pop(k) for k in OBJECTIVE_KEYS if k in kw}
    return Objective(model, **settings)(x, y, **kw)


def small_config(**kw):
    base = dict(vocab_size=61, block_size=24, n_embd=32, n_head=4, n_kv_head=2,
                n_prelude=1, n_core=2, n_coda=1, n_loops=3)
    base.update(kw)
    return LoopGPTConfig(**base)


def random_model(seed=0, **kw):
    """A model whose output projections are not zero, so every block really acts."""
    torch.manual_seed(seed)
    model = LoopGPT(small_config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(std=0.3 / math.sqrt(p.size(1)))
    return model.eval()


def reference_attention(attn, x, cos, sin, xq=None, qk_norm=True):
    """Causal attention written out by hand: RoPE, QK-norm, GQA; queries from xq if given."""
    B, T, C = x.shape
    H, Hkv, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    q = ((x if xq is None else xq) @ attn.q.weight.T).view(B, T, H, hd).transpose(1, 2)
    k = (x @ attn.k.weight.T).view(B, T, Hkv, hd).transpose(1, 2)
    v = (x @ attn.v.weight.T).view(B, T, Hkv, hd).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if qk_norm:
        q = q / q.pow(2).mean(-1, keepdim=True).add(torch.finfo(q.dtype).eps).sqrt()
        k = k / k.pow(2).mean(-1, keepdim=True).add(torch.finfo(k.dtype).eps).sqrt()
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)
    return y @ attn.proj.weight.T


def test_rotary_rotates_each_pair_by_its_angle():
    # RoPE: the pair (x_i, x_{i+hd/2}) at position p, as a complex number, times e^{i p θ_i}
    hd, T, base = 8, 6, 10000.0
    cos, sin = rotary_table(T, hd, base)
    x = torch.randn(1, 1, T, hd, dtype=torch.float64)
    out = apply_rotary(x, cos.double(), sin.double())
    for p in range(T):
        for i in range(hd // 2):
            z = complex(x[0, 0, p, i], x[0, 0, p, i + hd // 2]) * cmath.exp(1j * p * base ** (-2 * i / hd))
            assert abs(out[0, 0, p, i].item() - z.real) < 1e-6 and abs(out[0, 0, p, i + hd // 2].item() - z.imag) < 1e-6


def test_attention_matches_reference():
    model = random_model()
    attn = model.core[0].attn
    x = torch.randn(2, 10, 32)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    torch.testing.assert_close(attn(x, (cos, sin)), reference_attention(attn, x, cos, sin), atol=1e-5, rtol=1e-5)


def test_attention_without_qk_norm_matches_reference():
    model = random_model(qk_norm=False)
    attn = model.core[0].attn
    x = torch.randn(2, 7, 32)
    cos, sin = model.rope_cos[:7], model.rope_sin[:7]
    torch.testing.assert_close(attn(x, (cos, sin)), reference_attention(attn, x, cos, sin, qk_norm=False),
                               atol=1e-5, rtol=1e-5)


def test_rotary_is_relative():
    # RoPE: the score between positions i and j depends only on i - j
    model = random_model()
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = model.rope_cos, model.rope_sin

    def score(i, j):
        return (apply_rotary(q, cos[i], sin[i]) * apply_rotary(k, cos[j], sin[j])).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.allclose(score(5, 2), score(5, 3))


@pytest.mark.parametrize("injection", INJECTIONS)
def test_param_count_independent_of_loops(injection):
    counts = {L: LoopGPT(small_config(n_loops=L, injection=injection)).num_params() for L in (1, 4, 16)}
    assert len(set(counts.values())) == 1
    shapes = [{k: v.shape for k, v in LoopGPT(small_config(n_loops=L)).state_dict().items()} for L in (1, 9)]
    assert shapes[0] == shapes[1]


def test_core_weights_shared_across_loops():
    model = random_model()
    calls = []
    hook = model.core[0].register_forward_hook(lambda mod, inp, out: calls.append(1))
    idx = torch.randint(0, 61, (1, 8))
    for M in (1, 3, 7):
        calls.clear()
        model(idx, loops=M)
        assert len(calls) == M
    hook.remove()
    # the one set of core weights gets its gradient through the loops
    model.train()
    x, y = torch.randint(0, 61, (2, 8)), torch.randint(0, 61, (2, 8))
    _, loss = model(x, y, loops=4)
    loss.backward()
    assert model.core[0].attn.q.weight.grad is not None
    assert model.core[0].attn.q.weight.grad.abs().sum() > 0


def test_budget_changes_output_and_accepts_M_beyond_L():
    model = random_model()
    idx = torch.randint(0, 61, (2, 8))
    outs = [model(idx, loops=M)[0] for M in (1, 3, 6)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    torch.testing.assert_close(model(idx)[0], outs[1])  # default budget = n_loops
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="loop budget"):
            model(idx, loops=bad)


@pytest.mark.parametrize("injection", INJECTIONS)
def test_zero_init_blocks_are_identity(injection):
    # zero-initialised output projections make every block the identity at init, so
    # the untrained model's logits cannot depend on the loop budget
    torch.manual_seed(0)
    model = LoopGPT(small_config(injection=injection)).eval()
    idx = torch.randint(0, 61, (2, 8))
    torch.testing.assert_close(model(idx, loops=1)[0], model(idx, loops=9)[0])


def test_looped_model_at_one_loop_is_the_plain_stack():
    # prelude + core⊗1 + coda is just a stack of n_prelude + n_core + n_coda blocks
    looped = random_model(n_prelude=1, n_core=2, n_coda=1, n_loops=3)
    plain = LoopGPT(small_config(n_prelude=0, n_core=4, n_coda=0, n_loops=1)).eval()
    sd = looped.state_dict()
    # map: prelude.0 -> core.0, core.0 -> core.1, core.1 -> core.2, coda.0 -> core.3
    mapping = {"prelude.0.": "core.0.", "core.0.": "core.1.", "core.1.": "core.2.", "coda.0.": "core.3."}
    renamed = {}
    for k, v in sd.items():
        for src, dst in mapping.items():
            if k.startswith(src):
                k = dst + k[len(src):]
                break
        renamed[k] = v
    plain.load_state_dict(renamed)
    idx = torch.randint(0, 61, (2, 10))
    torch.testing.assert_close(looped(idx, loops=1)[0], plain(idx)[0])


def test_add_injection_reduces_to_none_at_one_loop():
    # loop 1 is a plain pass in every variant: LTi == LT when M = 1, and differs after
    a, b = random_model(injection="none"), random_model(injection="add")
    idx = torch.randint(0, 61, (2, 8))
    torch.testing.assert_close(a(idx, loops=1)[0], b(idx, loops=1)[0])
    assert not torch.allclose(a(idx, loops=2)[0], b(idx, loops=2)[0])


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("M", [1, 3, 6])  # 1, n_loops, 2 * n_loops
def test_cached_decoding_equals_full_forward(injection, M):
    model = random_model(injection=injection)
    idx = torch.randint(0, 61, (2, 20))
    full, _ = model(idx, loops=M)
    cache = model.new_cache(M)
    steps = [model(idx[:, :7], loops=M, cache=cache)[0]]              # prefill
    steps.append(model(idx[:, 7:10], loops=M, cache=cache)[0])        # a chunk after a prefix
    steps += [model(idx[:, t:t + 1], loops=M, cache=cache)[0] for t in range(10, 20)]  # one by one
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("M", [1, 3, 6])
def test_cached_generation_equals_uncached(injection, M):
    model = random_model(injection=injection)
    prompt = torch.randint(0, 61, (2, 5))
    # 30 new tokens run past block_size=24, where the window starts to slide
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=20)):
        out = []
        for use_cache in (True, False):
            g = torch.Generator().manual_seed(7)
            out.append(model.generate(prompt, 30, loops=M, use_cache=use_cache, generator=g, **kw))
        assert out[0].shape == (2, 35)
        assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("kw", [dict(injection="add"), dict(injection="full_attn", window_pattern="SL", n_core=3),
                                dict(injection="concat", state_init="randn", block_norm="sandwich", norm_gains=True),
                                dict(injection="add", norm_state=True, lora_rank=4, lora_targets="all"), dict(injection="diag")],
                         ids=["add", "flt_windows", "huginn", "lti_lora", "parcae"])
def test_static_decoding_equals_the_dynamic_cache(kw):
    # static decoding (what generate's CUDA graph replays): the position as a tensor, each
    # token written at it and attending to the whole buffer under a mask; the same logits
    # as the growing cache, token by token, and as the full forward
    model = random_model(**kw)
    idx = torch.randint(0, 61, (2, 24))
    M = 4
    full, _ = model(idx, loops=M)
    cache = StaticKVCache(model.effective_depth(M), model.config.block_size)
    model(idx[:, :6], loops=M, cache=cache)
    cache.pos_t = torch.tensor([cache.pos])
    steps = []
    for t in range(6, 24):  # the window pattern "SL" slides its S layers (window 24 // 4 = 6)
        cache.pos_t.fill_(cache.pos)
        steps.append(model(idx[:, t:t + 1], loops=M, cache=cache)[0])
    assert cache.pos == 24 and cache.k.shape[3] == 24  # written in place, never grown
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 6:], atol=2e-5, rtol=2e-5)


def test_cache_has_one_slot_per_loop_and_layer():
    model = random_model()
    cache = model.new_cache(5)
    assert cache.n_slots == 1 + 2 * 5 + 1
    model(torch.randint(0, 61, (1, 4)), loops=5, cache=cache)
    assert cache.pos == 4 and cache.k.shape[:4] == (12, 1, 2, 24)
    # every slot was written: keys of different loops differ
    assert not torch.allclose(cache.k[1, :, :, :4], cache.k[3, :, :, :4])


def test_too_long_input_is_an_error():
    model = random_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_softcap_bounds_logits_and_tied_embeddings():
    model = random_model(softcap=2.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
    logits, _ = model(torch.randint(0, 61, (1, 8)))
    assert logits.abs().max() <= 2.0
    tied = LoopGPT(small_config(tie_embeddings=True))
    assert tied.lm_head.weight is tied.wte.weight
    assert LoopGPT(small_config()).num_params() - tied.num_params() == 61 * 32


def test_gelu_mlp_and_no_gqa_run():
    model = random_model(mlp="gelu", n_kv_head=0)
    assert model.config.n_kv_head == 4
    logits, loss = model(torch.randint(0, 61, (2, 8)), torch.randint(0, 61, (2, 8)))
    assert logits.shape == (2, 8, 61) and loss.ndim == 0


@pytest.mark.parametrize("mlp", ["relu2", "gelu", "swiglu"])
def test_mlp_activations_and_width(mlp):
    # relu2: relu(x W1)^2 W2; gelu: gelu(x W1) W2; swiglu: (silu(x W_g) * x W_v) W2,
    # hidden width mlp_ratio * d
    model = random_model(mlp=mlp, mlp_ratio=2.5)
    block = model.core[0].mlp
    x = torch.randn(2, 5, 32)
    a = x @ block.fc.weight.T
    hidden = {"relu2": lambda: F.relu(a) ** 2, "gelu": lambda: F.gelu(a),
              "swiglu": lambda: F.silu(a[..., :80]) * a[..., 80:]}[mlp]()
    assert hidden.shape[-1] == 80
    torch.testing.assert_close(block(x), hidden @ block.proj.weight.T)


def test_bad_config_lists_valid_values():
    with pytest.raises(ValueError, match="valid: none, add"):
        small_config(injection="bogus")
    with pytest.raises(ValueError, match="n_kv_head"):
        small_config(n_head=4, n_kv_head=3)


def test_loss_ignores_minus_one_targets():
    model = random_model()
    x, y = torch.randint(0, 61, (2, 8)), torch.randint(0, 61, (2, 8))
    y_masked = y.clone()
    y_masked[:, :4] = -1
    logits, loss = model(x, y_masked)
    expected = F.cross_entropy(logits[:, 4:].reshape(-1, 61), y[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("injection", INJECTIONS)
def test_overfits_one_batch(injection):
    torch.manual_seed(0)
    overfit(LoopGPT(small_config(injection=injection)))


def overfit(model):
    """80 AdamW steps on one batch: the loss starts near ln(61) and ends under 0.5."""
    x = torch.randint(0, 61, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = configure_optimizer(model, 0.0, 1e-2, (0.9, 0.95))
    first = None
    for _ in range(80):
        _, loss = model(x, y)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0 and loss.item() < 0.5, (first, loss.item())


def test_flops_grow_with_loops_params_do_not():
    model = LoopGPT(small_config())
    assert flops_per_token(model, 6) > flops_per_token(model, 3) > flops_per_token(model, 1)
    assert model.effective_depth(6) == 1 + 2 * 6 + 1
    assert "unique params" in summary(model)


# ---- injection variants -------------------------------------------------------------------

def ref_block(block, x, cos, sin, xq=None):
    """A pre-norm block written out by hand; queries from norm(xq) when given."""
    a = reference_attention(block.attn, norm(x), cos, sin, xq=None if xq is None else norm(xq))
    x = x + a
    return x + block.mlp(norm(x))


def reference_loop(model, idx, M):
    """The README's injection table, written independently of LoopGPT.core_pass,
    for models with no prelude/coda and state_init='prelude'."""
    cfg = model.config
    T = idx.size(1)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    e = norm(model.wte(idx))
    h = e
    for t in range(M):
        inj = "none" if t == 0 else cfg.injection  # loop 1 is a plain pass
        if inj == "none":
            x = h
        elif inj == "add":
            x = norm(e + h)
        elif inj == "concat":
            x = torch.cat([norm(h), e], -1) @ model.adapter.weight.T
        elif inj == "diag":
            dt = F.softplus(model.diag_dt_bias)
            x = torch.exp(-dt * torch.exp(model.diag_A_log)) * h + dt * (norm(e) @ model.diag_B.weight.T)
        else:
            x = norm(e)
        for j, block in enumerate(model.core):
            if inj == "full_res":
                x = norm(x + h)
            use_q = inj == "full_attn" or (inj == "attn_first" and j == 0)
            x = ref_block(block, x, cos, sin, xq=h if use_q else None)
        h = norm(x) if cfg.injection in ("attn_first", "full_res", "full_attn") else x
    if cfg.injection == "diag":  # Parcae's C, from the final state back to the stream
        x = x @ model.diag_C.weight.T
    return (norm(x) @ model.lm_head.weight.T).float()


def randomize_extras(model):
    with torch.no_grad():
        if model.config.injection == "concat":
            model.adapter.weight.normal_(std=0.1)
        if model.config.injection == "diag":
            model.diag_A_log.normal_(std=0.5)
            model.diag_dt_bias.normal_(std=0.5)
            model.diag_B.weight.normal_(std=0.2)
            model.diag_C.weight.normal_(std=0.2)
    return model


@pytest.mark.parametrize("injection", INJECTIONS)
def test_injection_matches_design_table(injection):
    model = randomize_extras(random_model(injection=injection, n_prelude=0, n_coda=0, softcap=0.0))
    idx = torch.randint(0, 61, (2, 12))
    for M in (1, 2, 4):
        torch.testing.assert_close(model(idx, loops=M)[0], reference_loop(model, idx, M), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("injection", ["none", "add"])
def test_norm_state_is_the_flt_codes_lt_and_lti(injection):
    # FLT code (the FLT paper, arXiv 2605.18797): x_0 = wte(idx); loop 1 runs the core on norm(x_0); each
    # loop passes on h_t = norm(x_t); LT's loop t > 1 runs on h_{t-1}, LTi's on
    # norm(x_0 + h_{t-1}) with the raw embedding
    model = random_model(injection=injection, n_prelude=0, n_coda=0, softcap=0.0, norm_state=True)
    raw = random_model(injection=injection, n_prelude=0, n_coda=0, softcap=0.0)
    with torch.no_grad():
        model.wte.weight.mul_(3.0)  # an embedding whose scale is not 1, as after training
        raw.load_state_dict(model.state_dict())
    idx = torch.randint(0, 61, (2, 12))
    cos, sin = model.rope_cos[:12], model.rope_sin[:12]
    for M in (1, 2, 4):
        x0 = model.wte(idx)
        for t in range(M):
            x = norm(x0) if t == 0 else h if injection == "none" else norm(x0 + h)
            for block in model.core:
                x = ref_block(block, x, cos, sin)
            h = norm(x)
        torch.testing.assert_close(model(idx, loops=M)[0], (h @ model.lm_head.weight.T).float(), atol=2e-5, rtol=2e-5)
        assert (M == 1) == torch.allclose(model(idx, loops=M)[0], raw(idx, loops=M)[0], atol=1e-5)


@pytest.mark.parametrize("injection", INJECTIONS)
def test_norm_state_cached_decoding_equals_full_forward(injection):
    model = randomize_extras(random_model(injection=injection, norm_state=True,
                                          state_init="prelude" if injection == "none" else "randn"))
    idx = torch.randint(0, 61, (2, 10))
    for M in (1, 4):
        full, _ = model(idx, loops=M)
        cache = model.new_cache(M)
        model(idx[:, :6], loops=M, cache=cache)
        steps = [model(idx[:, t:t + 1], loops=M, cache=cache)[0] for t in range(6, 10)]
        torch.testing.assert_close(torch.cat(steps, 1), full[:, 6:], atol=2e-5, rtol=2e-5)


def test_injection_parameter_counts():
    d = 32
    n = {inj: LoopGPT(small_config(injection=inj)).num_params() for inj in INJECTIONS}
    for inj in ("add", "attn_first", "full_res", "full_attn"):  # no new parameters
        assert n[inj] == n["none"], inj
    assert n["concat"] == n["none"] + 2 * d * d          # W_a: 2d -> d
    assert n["diag"] == n["none"] + 2 * d + 2 * d * d    # A_log, dt_bias, B, C


@pytest.mark.parametrize("injection", INJECTIONS)
def test_every_injection_at_one_loop_is_the_plain_model(injection):
    # with h_0 = prelude output, loop 1 is a plain pass in every variant
    plain = random_model(injection="none")
    model = randomize_extras(random_model(injection=injection))
    model.load_state_dict(plain.state_dict(), strict=False)  # same blocks, extra params random
    if injection == "diag":  # except Parcae's C (state -> stream before the coda): at its init, I
        model.diag_C.weight.data.copy_(torch.eye(32))
    idx = torch.randint(0, 61, (2, 10))
    torch.testing.assert_close(model(idx, loops=1)[0], plain(idx, loops=1)[0])
    if injection != "none":
        assert not torch.allclose(model(idx, loops=3)[0], plain(idx, loops=3)[0])


def test_zero_state_init_differs_from_plain_except_add():
    # with h_0 = 0, loop 1 already injects: add gives norm(e + 0) = e when e is already
    # normed (no prelude: e = norm(wte)), the plain pass; concat gives W_a[0; e] (= 0 at
    # init), diag Δ ⊙ B ē, full_res inserts norms between layers, and full_attn /
    # attn_first take their queries from a zero state
    plain = random_model(injection="none", n_prelude=0)
    idx = torch.randint(0, 61, (2, 10))
    ref = plain(idx, loops=1)[0]
    for inj in INJECTIONS[1:]:
        model = random_model(injection=inj, state_init="zero", n_prelude=0)
        model.load_state_dict(plain.state_dict(), strict=False)
        same = torch.allclose(model(idx, loops=1)[0], ref, atol=1e-6)
        assert same == (inj == "add"), inj
    with pytest.raises(ValueError, match="never reads the input"):
        small_config(injection="none", state_init="zero")


def test_parcae_decay_in_unit_interval_and_not_decayed():
    model = LoopGPT(small_config(injection="diag"))
    A_bar, dt = model.parcae_decay()
    torch.testing.assert_close(A_bar, torch.full_like(A_bar, 0.447), atol=1e-4, rtol=0)
    torch.testing.assert_close(model.diag_B.weight, torch.eye(32))
    with torch.no_grad():
        model.diag_A_log.normal_(std=1.0)  # far beyond init; much larger underflows fp32
        model.diag_dt_bias.normal_(std=1.0)
    A_bar, dt = model.parcae_decay()
    assert (A_bar > 0).all() and (A_bar < 1).all() and (dt > 0).all()
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95))
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for p in (model.diag_A_log, model.diag_dt_bias, model.diag_B.weight, model.diag_C.weight):
        assert id(p) in no_decay
    assert id(model.core[0].attn.q.weight) not in no_decay
    torch.testing.assert_close(model.diag_C.weight, torch.eye(32))  # C = I: the coda reads the state
    torch.manual_seed(0)
    parcae = LoopGPT(LoopGPTConfig(injection="diag", state_init="randn_small", init="parcae", n_embd=64, n_head=2))
    small = math.sqrt(2 / (5 * 64))
    for w in (parcae.diag_C.weight, parcae.core[0].attn.q.weight, parcae.wte.weight):
        assert abs(w.std().item() - small) < 0.1 * small  # Parcae's small init
    assert parcae.core[0].attn.proj.weight.abs().sum() == 0 and parcae.core[0].mlp.proj.weight.abs().sum() == 0
    # Parcae's random state: std sqrt(2/(5d)), no sqrt(d) factor (Huginn's has it)
    assert abs(parcae.state_noise.std().item() - 0.987 * small) < 0.02 * small  # a ±3σ cut: std 0.987 σ
    huginn = LoopGPT(LoopGPTConfig(injection="diag", state_init="randn", n_embd=64, n_head=2))
    assert abs(huginn.state_noise.std().item() - 0.987 * small * 8) < 0.02 * small * 8


def test_concat_adapter_starts_as_identity_on_the_state():
    model = LoopGPT(small_config(injection="concat"))
    h, e = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    torch.testing.assert_close(model.adapter(torch.cat([h, e], -1)), h)


def test_randn_state_is_random_in_training_and_fixed_at_inference():
    model = random_model(injection="concat", state_init="randn")
    idx = torch.randint(0, 61, (2, 8))
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])
    noise = model.state_noise
    assert noise.std().item() == pytest.approx(math.sqrt(2 / 5), rel=0.1)  # sqrt(2/(5d)) * sqrt(d)


@pytest.mark.parametrize("injection", ["concat", "full_attn"])
def test_cached_generation_with_random_state_and_sandwich(injection):
    model = random_model(injection=injection, state_init="randn", block_norm="sandwich")
    prompt = torch.randint(0, 61, (1, 4))
    for M in (1, 3, 6):
        a = model.generate(prompt, 25, loops=M, temperature=0, use_cache=True)
        b = model.generate(prompt, 25, loops=M, temperature=0, use_cache=False)
        assert torch.equal(a, b)


def test_sandwich_norm_keeps_loop_outputs_at_unit_rms():
    model = random_model(block_norm="sandwich")
    rms = residual_rms(model, torch.randint(0, 61, (2, 8)), loops=6)
    assert len(rms) == 6
    assert all(r == pytest.approx(1.0, abs=1e-3) for r in rms)


def test_residual_rms_grows_for_plain_loop_with_large_updates():
    # the diagnostic itself: LT adds each loop's update to an ever larger residual
    model = random_model(injection="none")
    with torch.no_grad():
        for p in model.core.parameters():
            p.mul_(3.0)
    rms = residual_rms(model, torch.randint(0, 61, (2, 8)), loops=5)
    assert len(rms) == 5 and rms[-1] > rms[0]


# ---- modulation and schedules -------------------------------------------------------------

def modulated_model(modulation, seed=0, **kw):
    """A model whose modulation is not zero (as after training), so t, Δ and i matter."""
    model = random_model(seed=seed, modulation=modulation, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modulation." in name or "_embed." in name:
                p.normal_(std=0.2)
    return model


@pytest.mark.parametrize("modulation", ["tmlt", "loopformer"])
def test_modulated_block_is_identity_at_init(modulation):
    torch.manual_seed(0)
    model = LoopGPT(small_config(modulation=modulation)).eval()
    block = model.core[0]
    assert block.attn.proj.weight.abs().sum() > 0  # not zero: the zero gates alone make it the identity
    x = torch.randn(2, 6, 32)
    rope = (model.rope_cos[:6], model.rope_sin[:6])
    c = model.conditioning(2, 0.25, 0.125)
    torch.testing.assert_close(block(x, rope, c=c), x)
    idx = torch.randint(0, 61, (2, 8))
    torch.testing.assert_close(model(idx, loops=1)[0], model(idx, loops=5)[0])
    if modulation == "loopformer":
        torch.testing.assert_close(model(idx, loops=1)[0], model(idx, schedule=[0.5, 0.25, 0.25])[0])


def test_modulated_core_learns_from_zero_gates():
    # zero gates with zero output projections would never get a gradient; ours do
    torch.manual_seed(0)
    model = LoopGPT(small_config(modulation="loopformer"))
    x, y = torch.randint(0, 61, (2, 8)), torch.randint(0, 61, (2, 8))
    model(x, y)[1].backward()
    assert model.core[0].modulation.weight.grad.abs().sum() > 0


def test_schedules():
    model = modulated_model("loopformer")
    idx = torch.randint(0, 61, (2, 8))
    torch.testing.assert_close(model(idx, loops=4)[0], model(idx, schedule=[0.25] * 4)[0])
    a = model(idx, schedule=[0.5, 0.25, 0.25])[0]
    b = model(idx, schedule=[0.25, 0.25, 0.5])[0]
    assert not torch.allclose(a, b)  # same budget, different schedule, different model
    for bad in ([0.5, 0.4], [1.2, -0.2], [], [0.5, "x"], [0.5, 0.5, 0.0]):
        with pytest.raises(ValueError, match="schedule"):
            model(idx, schedule=bad)
    with pytest.raises(ValueError, match="loops=3 but the schedule has 2 steps"):
        model(idx, loops=3, schedule=[0.5, 0.5])
    plain = random_model()
    with pytest.raises(ValueError, match="needs modulation='loopformer'"):
        plain(idx, schedule=[0.75, 0.25])
    torch.testing.assert_close(plain(idx, schedule=[0.5, 0.5])[0], plain(idx, loops=2)[0])


@pytest.mark.parametrize("schedule", [[0.5, 0.25, 0.125, 0.125], [0.125] * 8, [1.0]])
def test_cached_generation_under_schedules(schedule):
    model = modulated_model("loopformer", injection="add")
    prompt = torch.randint(0, 61, (2, 5))
    a = model.generate(prompt, 25, schedule=schedule, temperature=0, use_cache=True)
    b = model.generate(prompt, 25, schedule=schedule, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_tmlt_changes_with_loop_index():
    model = modulated_model("tmlt")
    c = [model.conditioning(i, 0.0, 1.0) for i in range(3)]
    assert not torch.allclose(c[0], c[1])
    # TMLT ignores t and Δ: only the index matters
    torch.testing.assert_close(model.conditioning(1, 0.5, 0.5), model.conditioning(1, 0.0, 0.1))


def hidden(model, idx, **kw):
    return norm(model.trunk(idx, model.steps(**kw)))


@pytest.mark.parametrize("modulation", ["none", "tmlt"])
def test_prefix_route_equals_a_separate_prefix_forward(modulation):
    # EE baselines: the short route's loss, read off the full route's loop-S state, equals
    # the loss of a separate forward at M = S: no second forward is needed
    model = modulated_model(modulation)
    x, y = torch.randint(0, 61, (2, 10)), torch.randint(0, 61, (2, 10))
    for S in (1, 2, 3):
        loss = loss_of(model, x, y, short=S, lambda_short=0.1, lambda_cons=0.1)
        full_logits, ce_full = model(x, y)
        _, ce_short = model(x, y, loops=S)
        mse = F.mse_loss(hidden(model, x, loops=S), hidden(model, x))
        torch.testing.assert_close(loss, ce_full + 0.1 * ce_short + 0.1 * mse)


def test_shortcut_route_loss_and_stop_gradient():
    model = modulated_model("loopformer")
    x, y = torch.randint(0, 61, (2, 10)), torch.randint(0, 61, (2, 10))
    short = [0.5, 0.25, 0.25]  # L = 3 full route vs a route of coarse-then-fine steps
    loss = loss_of(model, x, y, short=short, lambda_short=0.1, lambda_cons=0.2)
    _, ce_full = model(x, y)
    _, ce_short = model(x, y, schedule=short)
    mse = F.mse_loss(hidden(model, x, schedule=short), hidden(model, x))
    torch.testing.assert_close(loss, ce_full + 0.1 * ce_short + 0.2 * mse)
    # with only the consistency term, the full route gets no gradient from it: the lm_head
    # sees only the full CE, exactly as without a short route
    model.zero_grad()
    loss_of(model, x, y, short=short, lambda_short=0.0, lambda_cons=1.0).backward()
    g_with = model.lm_head.weight.grad.clone()
    model.zero_grad()
    model(x, y)[1].backward()
    torch.testing.assert_close(g_with, model.lm_head.weight.grad)


def test_short_routes_lie_on_the_grid():
    import numpy as np
    rng = np.random.default_rng(0)
    for L in (2, 3, 8):
        lengths, firsts = set(), set()
        for _ in range(400):
            route = sample_short_route(L, rng)
            units = [round(s * L) for s in route]
            assert all(u >= 1 and abs(s * L - u) < 1e-9 for s, u in zip(route, units))
            assert sum(units) == L and 1 <= len(route) <= L - 1
            lengths.add(len(route))
            firsts.add(units[0])
        assert lengths == set(range(1, L))  # S ~ U{1..L-1}: every length occurs
        # the first step takes anything from 1/L (S > 1) to all of it (S = 1)
        assert firsts == (set(range(1, L + 1)) if L > 2 else {2})


# ---- training recipes: truncated backprop, checkpointing, per-sequence depth -----------------

def grads(model, x, y, **kw):
    model.zero_grad()
    loss_of(model, x, y, **kw).backward()
    return {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}


@pytest.mark.parametrize("injection", ["none", "add", "concat", "full_attn"])
def test_bptt_k_at_least_loops_is_full_backprop(injection):
    x, y = torch.randint(0, 61, (2, 10)), torch.randint(0, 61, (2, 10))
    full = grads(randomize_extras(random_model(injection=injection)).train(), x, y, loops=4)
    for k in (4, 9):
        g = grads(randomize_extras(random_model(injection=injection, bptt_k=k)).train(), x, y, loops=4)
        for n in full:
            torch.testing.assert_close(g[n], full[n], msg=n)
    g = grads(randomize_extras(random_model(injection=injection, bptt_k=2)).train(), x, y, loops=4)
    assert not torch.allclose(g["core.0.attn.q.weight"], full["core.0.attn.q.weight"])
    assert g["core.0.attn.q.weight"].abs().sum() > 0
    # the prelude is reached only through inputs the last k loops re-read: not through LT's
    prelude_grad = g["prelude.0.attn.q.weight"]
    assert (prelude_grad is None or prelude_grad.abs().sum() == 0) == (injection == "none")


@pytest.mark.parametrize("injection", ["add", "full_res"])
def test_checkpointed_loops_give_the_same_gradients(injection):
    x, y = torch.randint(0, 61, (2, 10)), torch.randint(0, 61, (2, 10))
    plain = grads(random_model(injection=injection).train(), x, y, loops=3)
    ckpt = grads(random_model(injection=injection, checkpoint_loops=True).train(), x, y, loops=3)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("injection", ["none", "diag"])
def test_per_sequence_depth_runs_each_row_its_own_loops(injection):
    state_init = "prelude" if injection == "none" else "zero"
    model = random_model(injection=injection, state_init=state_init)
    idx = torch.randint(0, 61, (3, 8))
    depths = torch.tensor([1, 4, 2])
    logits = model.logits(model.norm_f(model.trunk(idx, model.steps(4), depths=depths)))
    for b in range(3):
        torch.testing.assert_close(logits[b:b + 1], model(idx[b:b + 1], loops=int(depths[b]))[0])
    with pytest.raises(ValueError, match="per-sequence"):
        loss_of(model, idx, idx, depths=depths, short=1)
    with pytest.raises(ValueError, match="do not depend on their index"):
        loss_of(random_model(injection="add"), idx, idx, depths=depths)  # loop 1 is special with state_init='prelude'


def test_per_sequence_bptt_gives_every_row_its_last_k_loops():
    # Parcae: row b runs d_b - min(d_b, k) loops without gradient, then min(d_b, k) with,
    # so the batch's gradient is the mean of each row's own truncated gradient; a row
    # shallower than the batch's deepest still sends gradient through the core
    k, depths = 2, torch.tensor([1, 2, 3, 5])
    model = random_model(injection="diag", state_init="zero", bptt_k=k).train()
    x, y = torch.randint(0, 61, (4, 10)), torch.randint(0, 61, (4, 10))
    batch = grads(model, x, y, depths=depths)
    rows = [grads(model, x[b:b + 1], y[b:b + 1], loops=int(depths[b])) for b in range(4)]
    for n, g in batch.items():
        ref = sum(r[n] for r in rows if r[n] is not None) / 4
        torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-4, msg=n)
    assert rows[0]["core.0.attn.q.weight"].abs().sum() > 0  # depth 1 < 5 - k: still a core gradient


def test_per_loop_lora_starts_as_the_shared_model():
    shared = random_model(injection="add")
    lora = random_model(injection="add", lora_rank=4)
    lora.load_state_dict(shared.state_dict(), strict=False)
    idx = torch.randint(0, 61, (2, 10))
    for M in (1, 3, 5):  # B = 0: every loop is the shared block
        torch.testing.assert_close(lora(idx, loops=M)[0], shared(idx, loops=M)[0])
    assert lora.num_params() - shared.num_params() == 3 * 2 * 4 * (32 + 32 + 32 + 16)  # L k r (d_in + d_out), q and v
    with torch.no_grad():
        for block in lora.core:
            block.attn.q.lora_B[1].normal_(std=0.5)  # loop 2 only
    torch.testing.assert_close(lora(idx, loops=1)[0], shared(idx, loops=1)[0])
    assert not torch.allclose(lora(idx, loops=2)[0], shared(idx, loops=2)[0])
    # the KV cache stays exact with per-loop adapters, beyond n_loops too
    with torch.no_grad():
        for block in lora.core:
            block.attn.v.lora_B.normal_(std=0.5)
    prompt = torch.randint(0, 61, (1, 4))
    for M in (3, 6):
        a = lora.generate(prompt, 12, loops=M, temperature=0)
        assert torch.equal(a, lora.generate(prompt, 12, loops=M, temperature=0, use_cache=False))


def test_lora_saved_before_version_3_loads_into_the_layers():
    # checkpoints before version 3 kept per-loop LoRA as lora_A_q (loops, blocks, r, in) on the model
    from loopgpt import model_from_checkpoint
    model = random_model(injection="add", lora_rank=4)
    with torch.no_grad():
        for block in model.core:
            block.attn.q.lora_B.normal_(std=0.5)
            block.attn.v.lora_B.normal_(std=0.5)
    old = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name in ("q", "v"):
        for which in "AB":
            old[f"lora_{which}_{name}"] = torch.stack([getattr(getattr(b.attn, name), f"lora_{which}") for b in model.core], 1)
    loaded = model_from_checkpoint({"model": old, "model_config": model.config.to_dict()}).eval()
    idx = torch.randint(0, 61, (2, 10))
    assert torch.equal(loaded(idx, loops=3)[0], model(idx, loops=3)[0])


# ---- Mixture-of-Recursions routing -------------------------------------------------------------

def mor_model(**kw):
    return random_model(routing="mor", n_loops=4, **kw)


def test_mor_keeps_the_capacity_and_nests_the_selections():
    model = mor_model(block_size=128)
    record = {}
    with torch.no_grad():
        model.trunk(torch.randint(0, 61, (8, 128)), model.steps(), record=record)
    routes = record["routes"]
    assert len(routes) == 4
    for i, (_, cand, sel) in enumerate(routes):
        assert torch.equal(cand & sel, sel)  # kept tokens were candidates: depth = recursions until dropped
        assert abs(sel.float().mean().item() - (4 - i) / 4) < 0.05, (i, sel.float().mean())
        if i:
            assert torch.equal(cand, routes[i - 1][2])


def test_mor_is_causal():
    # MoR's sequence-wide top-k would let future tokens change who is kept; our rule must not
    model = mor_model()
    idx = torch.randint(0, 61, (2, 20))
    other = idx.clone()
    other[:, 12:] = torch.randint(0, 61, (2, 8))
    a, b = {}, {}
    with torch.no_grad():
        model.trunk(idx, model.steps(), record=a)
        model.trunk(other, model.steps(), record=b)
    a, b = a["routes"], b["routes"]
    assert any(not torch.equal(ra[2][:, 12:], rb[2][:, 12:]) for ra, rb in zip(a, b))  # the test has teeth
    for ra, rb in zip(a, b):
        assert torch.equal(ra[2][:, :12], rb[2][:, :12])
    torch.testing.assert_close(model(idx)[0][:, :12], model(other)[0][:, :12], atol=0, rtol=0)


def test_mor_update_is_h_plus_g_times_the_core_output():
    # MoR code: a kept token takes h + g f(h), f = the core blocks with their residuals, so
    # (1 + g) h + g Δ(h); g = router_scale σ(s). A zero router gives equal scores: nobody
    # outscores anyone, so every token is kept while keep > 1/2 (recursions 1..3 of 4)
    model = mor_model(n_prelude=0, n_coda=0, softcap=0.0)
    with torch.no_grad():
        model.router.weight.zero_()
    idx = torch.randint(0, 61, (2, 16))
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]
    g = 0.1 * 0.5
    h = norm(model.wte(idx))
    for M in (1, 2, 3):
        f = h
        for block in model.core:
            f = ref_block(block, f, cos, sin)
        h = h + g * f
        torch.testing.assert_close(model(idx, loops=M)[0], (norm(h) @ model.lm_head.weight.T).float(),
                                   atol=1e-5, rtol=1e-5)
    # recursion 4 keeps half: the first token (n = 1) is dropped and keeps its state
    four, three = model(idx, loops=4)[0], model(idx, loops=3)[0]
    torch.testing.assert_close(four[:, 0], three[:, 0])
    assert not torch.allclose(four, three)


def test_mor_key_mask_is_attention_over_the_kept_tokens_only():
    # a kept token attends to the kept tokens as if the others were not in the sequence
    model = random_model()
    attn = model.core[0].attn
    x = torch.randn(1, 12, 32)
    kept = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1]], dtype=torch.bool)
    cos, sin = model.rope_cos[:12], model.rope_sin[:12]
    y = attn(x, (cos, sin), KeyMask(None, kept))
    where = kept[0].nonzero().flatten()
    ref = reference_attention(attn, x[:, where], cos[where], sin[where])  # same positions, others gone
    torch.testing.assert_close(y[:, where], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("M", [1, 2, 4])
def test_mor_cached_decoding_and_generation(M):
    model = mor_model()
    idx = torch.randint(0, 61, (2, 20))
    full, _ = model(idx, loops=M)
    cache = model.new_cache(M)
    steps = [model(idx[:, :7], loops=M, cache=cache)[0], model(idx[:, 7:10], loops=M, cache=cache)[0]]
    steps += [model(idx[:, t:t + 1], loops=M, cache=cache)[0] for t in range(10, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # one row at a time: a dropped token leaves the loop early and never writes its deeper K/V
    for B in (1, 2):
        prompt = torch.randint(0, 61, (B, 5))
        used = []
        a = generate(model, prompt, 30, loops=M, temperature=0, loops_used=used)
        assert torch.equal(a, model.generate(prompt, 30, loops=M, temperature=0, use_cache=False))
        flat = [u for step in used for u in step]
        assert min(flat) >= 1 and max(flat) <= M and (M == 1 or min(flat) < M)


def test_mor_router_loss_and_errors():
    model = mor_model().train()
    idx = torch.randint(0, 61, (2, 16))
    with_aux = loss_of(model, idx, idx, lambda_router=1.0)
    without = loss_of(model, idx, idx, lambda_router=0.0)
    record = {}
    model.trunk(idx, model.steps(), record=record)
    routes = record["routes"]
    bce = 0.0  # MoR code: summed over recursions, each the mean over its candidates
    for score, cand, kept in routes:
        s, y = score[cand], kept[cand].float()
        bce = bce - (y * F.logsigmoid(s) + (1 - y) * F.logsigmoid(-s)).mean()
    torch.testing.assert_close(with_aux - without, bce)
    with_aux.backward()
    assert model.router.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="budget 5 is too many"):
        model(idx, loops=5)
    with pytest.raises(ValueError, match="routing='mor'"):
        small_config(routing="mor", injection="add")
    with pytest.raises(ValueError, match="exit criterion"):
        generate(model.eval(), idx[:, :3], 2, exit=("kl", 1e-3))


def test_mor_overfits_one_batch():
    torch.manual_seed(0)
    model = LoopGPT(small_config(routing="mor", n_loops=4))
    x = torch.randint(0, 61, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = configure_optimizer(model, 0.0, 1e-2, (0.9, 0.95))
    for _ in range(80):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, loss.item()


# ---- exits -------------------------------------------------------------------------------------

@pytest.mark.parametrize("exit", [("kl", 1e-30), ("latent", 1e-12), ("gate", 1.0)])
@pytest.mark.parametrize("injection", ["add", "full_attn"])
def test_exit_that_never_fires_equals_fixed_budget(exit, injection):
    model = randomize_extras(random_model(injection=injection, exit_gate=True))
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5)  # trained-like logits, so loops change the distribution
    prompt = torch.randint(0, 61, (2, 5))
    used = []
    a = generate(model, prompt, 15, loops=4, temperature=0, exit=exit, loops_used=used)
    b = model.generate(prompt, 15, loops=4, temperature=0)
    assert torch.equal(a, b)
    assert len(used) == 14 and all(u == [4, 4] for u in used)  # the first token comes from the prefill


@pytest.mark.parametrize("exit", [("kl", 1e9), ("latent", 1e9)])
def test_exit_that_always_fires_stops_at_min_loops_and_fills_the_cache(exit):
    model = random_model(injection="add")
    prompt = torch.randint(0, 61, (1, 5))
    used = []
    generate(model, prompt, 6, loops=5, temperature=0, exit=exit, min_loops=2, loops_used=used)
    assert all(u == [2] for u in used)
    # decode one more token by hand and check that loops 3..5 hold copies of loop 2's K/V
    cache = model.new_cache(5)
    model(prompt, loops=5, cache=cache)
    decode_with_exit(model, torch.tensor([[7]]), model.steps(5), cache, exit, min_loops=2)
    pos, first, k = 5, 1, 2
    for i in (2, 3, 4):
        for j in range(k):
            torch.testing.assert_close(cache.k[first + i * k + j, :, :, pos], cache.k[first + 1 * k + j, :, :, pos])
    assert not torch.allclose(cache.k[first + 0 * k, :, :, pos], cache.k[first + 1 * k, :, :, pos])


def test_rows_that_stop_at_different_loops_each_fill_the_cache_from_their_own_last_loop():
    model = random_model(injection="add")
    prompt = torch.randint(0, 61, (4, 5))
    for threshold in (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3):  # one where the rows stop at different loops
        cache = model.new_cache(5)
        model(prompt, loops=5, cache=cache)
        _, used = decode_with_exit(model, torch.tensor([[7], [8], [9], [10]]), model.steps(5), cache, ("latent", threshold),
                                         min_loops=1)
        if len(set(used.tolist())) > 1:
            break
    assert len(set(used.tolist())) > 1, used
    pos, first, k = 5, 1, 2
    for b, u in enumerate(used.tolist()):
        for i in range(u, 5):  # the loops row b skipped hold its loop u's K/V
            for j in range(k):
                torch.testing.assert_close(cache.k[first + i * k + j, b, :, pos], cache.k[first + (u - 1) * k + j, b, :, pos])
                torch.testing.assert_close(cache.v[first + i * k + j, b, :, pos], cache.v[first + (u - 1) * k + j, b, :, pos])


def test_gate_exit_and_bad_exits():
    model = random_model(exit_gate=True)
    with torch.no_grad():
        model.exit_gate.bias.fill_(10.0)  # λ ≈ 1: stop after the first loop
    used = []
    generate(model, torch.randint(0, 61, (1, 3)), 4, loops=4, temperature=0, exit=("gate", 0.9), loops_used=used)
    assert all(u == [1] for u in used)
    with pytest.raises(ValueError, match="exit_gate=True"):
        generate(random_model(), torch.zeros(1, 2, dtype=torch.long), 2, exit=("gate", 0.5))
    for bad in (("kl",), ("sometimes", 1.0), ("kl", -1.0), ("gate", 2.0)):
        with pytest.raises(ValueError, match="exit"):
            generate(model, torch.zeros(1, 2, dtype=torch.long), 2, exit=bad)


def test_per_step_supervision():
    model = random_model(injection="add")
    x, y = torch.randint(0, 61, (2, 10)), torch.randint(0, 61, (2, 10))
    y[0, :3] = -1
    ce = [model(x, y, loops=t)[1] for t in (1, 2, 3)]  # no modulation: a prefix is a shorter forward
    torch.testing.assert_close(loss_of(model, x, y, loops=3, step_weights=[0, 0, 1]), ce[2])
    torch.testing.assert_close(loss_of(model, x, y, loops=3, step_weights=[1, 1, 1]), sum(ce) / 3)
    torch.testing.assert_close(loss_of(model, x, y, loops=3, step_weights=[0, 1, 3]), (ce[1] + 3 * ce[2]) / 4)
    with pytest.raises(ValueError, match="step_weights"):
        loss_of(model, x, y, loops=3, step_weights=[1, 1])


def test_ouro_gate_losses():
    model = random_model(injection="add", exit_gate=True)
    x, y = torch.randint(0, 61, (2, 10)), torch.randint(0, 61, (2, 10))
    ce = [model(x, y, loops=t)[1] for t in (1, 2, 3)]
    with torch.no_grad():
        model.exit_gate.weight.zero_()
        model.exit_gate.bias.fill_(-30.0)  # λ ≈ 0: all probability on the last loop, zero entropy
    torch.testing.assert_close(loss_of(model, x, y, loops=3, gate_stage=1, gate_beta=0.1), ce[2])
    with torch.no_grad():
        model.exit_gate.bias.fill_(30.0)   # λ ≈ 1: everything exits after loop 1
    torch.testing.assert_close(loss_of(model, x, y, loops=3, gate_stage=1, gate_beta=0.1), ce[0])
    with torch.no_grad():
        model.exit_gate.bias.fill_(0.0)    # λ = 1/2: p = (1/2, 1/4, 1/4)
    p = torch.tensor([0.5, 0.25, 0.25])
    expected = (p * torch.stack(ce)).sum() + 0.1 * (p * p.log()).sum()
    # the entropy term is per token and so are the CEs: with one λ for all tokens the mean factorises
    torch.testing.assert_close(loss_of(model, x, y, loops=3, gate_stage=1, gate_beta=0.1), expected)
    # stage 2: only the gate gets gradients, the LM is frozen
    model.zero_grad()
    loss = loss_of(model, x, y, loops=3, gate_stage=2)
    loss.backward()
    assert model.exit_gate.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("exit_gate"))


def test_ouro_stage_two_is_eq_5_6():
    # Ouro (arXiv 2510.25741) Eq. 5-6: I_t = max(0, CE_{t-1} - CE_t) per token (detached),
    # w_t = σ(k (I_t - γ)), loss = (1/T) Σ_{t=2..T} mean_tokens BCE(1 - λ_t, w_t): the gate
    # after loop t is paired with what loop t itself gained
    model = random_model(injection="add", exit_gate=True, n_coda=0)
    with torch.no_grad():
        model.exit_gate.weight.normal_(std=1.0)  # λ differs from loop to loop and token to token
    x, y = torch.randint(0, 61, (2, 10)), torch.randint(0, 61, (2, 10))
    y[1, :4] = -1
    T, k, gamma = 3, 50.0, 0.005
    with torch.no_grad():
        ce = [F.cross_entropy(model(x, loops=t)[0].view(-1, 61), y.view(-1), ignore_index=-1, reduction="none")
              for t in range(1, T + 1)]
        lam = [torch.sigmoid(model.exit_gate(norm(model.trunk(x, model.steps(t))))).view(-1) for t in range(1, T + 1)]
    valid = y.view(-1) != -1
    expected = 0.0
    for t in range(1, T):  # 0-based: loop t + 1 against loop t
        w = torch.sigmoid(k * ((ce[t - 1] - ce[t]).clamp_min(0) - gamma))
        bce = -(w * torch.log(1 - lam[t]) + (1 - w) * torch.log(lam[t]))
        expected = expected + bce[valid].mean()
    torch.testing.assert_close(loss_of(model, x, y, loops=T, gate_stage=2, gate_k=k, gate_gamma=gamma), expected / T)


def test_gate_all_exit_runs_every_loop_and_picks_the_exit_state():
    # Ouro's released code: all loops run, the first state whose exit CDF reaches q goes
    # to the head; the cache is then the fixed-budget cache, and the logits are the
    # chosen loop's
    model = random_model(injection="none", exit_gate=True, n_coda=0, norm_state=True)
    with torch.no_grad():
        model.exit_gate.weight.normal_(std=2.0)
    idx = torch.randint(0, 61, (3, 8))
    M, q = 4, 0.5
    cache = model.new_cache(M)
    with torch.no_grad():
        model(idx[:, :7], loops=M, cache=cache)
        logits, used = decode_with_exit(model, idx[:, 7:], model.steps(M), cache, ("gate_all", q), 1)
        full_cache = model.new_cache(M)
        model(idx, loops=M, cache=full_cache)
        torch.testing.assert_close(cache.k, full_cache.k)  # every (loop, layer) K/V is real
        for b in range(3):
            cdf, s = [], torch.tensor(1.0)
            for t in range(1, M + 1):
                lam = torch.sigmoid(model.exit_gate(norm(model.trunk(idx[b:b + 1], model.steps(t)))))[0, -1, 0]
                s = s * (1 - lam)
                cdf.append(1 - s)
            t_exit = next((t for t in range(1, M) if cdf[t - 1] >= q), M)
            assert used[b] == t_exit
            torch.testing.assert_close(logits[b, -1], model(idx[b:b + 1], loops=t_exit)[0][0, -1])
    assert len(set(used.tolist())) > 1  # the rows exit at different loops


# ---- learnable norm gains and the papers' inits -----------------------------------------------

@pytest.mark.parametrize("block_norm", ["pre", "sandwich"])
def test_norm_gains_start_as_the_parameter_free_model(block_norm):
    plain = random_model(injection="concat", block_norm=block_norm, state_init="randn")
    gains = random_model(injection="concat", block_norm=block_norm, state_init="randn", norm_gains=True)
    missing, unexpected = gains.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("weight") and "norm" in k for k in missing)
    per_block = 4 if block_norm == "sandwich" else 2
    assert len(missing) == per_block * 4 + 1  # every block's norms and the final norm
    assert gains.num_params() - plain.num_params() == (per_block * 4 + 1) * 32
    idx = torch.randint(0, 61, (2, 10))
    for M in (1, 3):
        torch.testing.assert_close(gains(idx, loops=M)[0], plain(idx, loops=M)[0])
    with torch.no_grad():
        for name, p in gains.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    assert not torch.allclose(gains(idx, loops=3)[0], plain(idx, loops=3)[0])
    # a gain multiplies norm(x) feature by feature
    x = torch.randn(3, 32)
    n = gains.core[0].norm_1
    torch.testing.assert_close(n(x), x / x.pow(2).mean(-1, keepdim=True).add(torch.finfo(x.dtype).eps).sqrt() * n.weight)
    # and the KV cache stays exact
    full, _ = gains(idx, loops=3)
    cache = gains.new_cache(3)
    gains(idx[:, :6], loops=3, cache=cache)
    steps = [gains(idx[:, t:t + 1], loops=3, cache=cache)[0] for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 6:], atol=2e-5, rtol=2e-5)


def test_huginn_and_loopformer_inits():
    d = 64
    cfg = dict(vocab_size=61, block_size=16, n_embd=d, n_head=2, n_prelude=2, n_core=4, n_coda=2, n_loops=8)
    small = math.sqrt(2 / (5 * d))
    torch.manual_seed(0)
    huginn = LoopGPT(LoopGPTConfig(injection="concat", state_init="randn", block_norm="sandwich", init="huginn", **cfg))
    depth = 2 + 2 + 4 * 8
    assert abs(huginn.core[0].attn.q.weight.std().item() - small) < 0.1 * small
    assert abs(huginn.core[0].attn.proj.weight.std().item() - small / math.sqrt(2 * depth)) < 0.1 * small / math.sqrt(2 * depth)
    assert abs(huginn.adapter.weight.std().item() - small) < 0.1 * small  # random, not [I | 0]
    assert abs(huginn.wte.weight.std().item() - small) < 0.1 * small
    torch.manual_seed(0)
    lf = LoopGPT(LoopGPTConfig(modulation="loopformer", init="loopformer", **cfg))
    assert abs(lf.core[0].modulation.weight.std().item() - 0.02) < 0.002  # the official code's N(0, 0.02)
    assert lf.core[0].modulation.bias.abs().sum() == 0
    assert abs(lf.core[0].mlp.proj.weight.std().item() - 0.02 / math.sqrt(2 * 8)) < 0.002
    with pytest.raises(ValueError, match="valid: nanochat, huginn, parcae, loopformer"):
        LoopGPTConfig(init="xavier")


def test_sliding_window_pattern_and_cached_decoding():
    # FLT's window_pattern, tiled over the core, the last core layer always full; a short
    # layer's query sees itself and the block_size/4 - 1 keys before it
    model = randomize_extras(random_model(injection="full_attn", n_core=3, window_pattern="S", block_size=24))
    assert [b.attn.window for b in model.core] == [6, 6, 0]
    assert all(b.attn.window == 0 for b in list(model.prelude) + list(model.coda))
    attn = model.core[0].attn
    x = torch.randn(2, 20, 32)
    cos, sin = model.rope_cos[:20], model.rope_sin[:20]
    full = reference_attention(attn, x, cos, sin)
    y = attn(x, (cos, sin))
    torch.testing.assert_close(y[:, :6], full[:, :6], atol=1e-5, rtol=1e-5)  # the window covers the prefix
    for t in (6, 13, 19):  # later: exactly attention over the last 6 positions
        ref = reference_attention(attn, x[:, t - 5:t + 1], cos[t - 5:t + 1], sin[t - 5:t + 1])[:, -1]
        torch.testing.assert_close(y[:, t], ref, atol=1e-5, rtol=1e-5)
    idx = torch.randint(0, 61, (2, 20))
    for M in (1, 3):
        logits, _ = model(idx, loops=M)
        cache = model.new_cache(M)
        steps = [model(idx[:, :9], loops=M, cache=cache)[0], model(idx[:, 9:12], loops=M, cache=cache)[0]]
        steps += [model(idx[:, t:t + 1], loops=M, cache=cache)[0] for t in range(12, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), logits, atol=2e-5, rtol=2e-5)
    assert [b.attn.window for b in random_model(n_core=4, window_pattern="SSL").core] == [6, 6, 0, 0]
    with pytest.raises(ValueError, match="window_pattern"):
        small_config(window_pattern="SX")


def test_huginn_latent_exit_at_loop_one_compares_with_h0_and_sandwich_adapter_reads_raw_h0():
    # Huginn's code: loop 1's relative change is measured against the initial state h_0,
    # and with sandwich blocks the adapter reads the state raw, h_0 included
    model = randomize_extras(random_model(injection="concat", state_init="randn", block_norm="sandwich", n_coda=0))
    idx = torch.randint(0, 61, (1, 9))
    T = idx.size(1)
    rope = (model.rope_cos[:T], model.rope_sin[:T])
    with torch.no_grad():
        e = model.prelude[0](norm(model.wte(idx)), rope)
        h0 = model.state_noise[:T].unsqueeze(0)
        x = model.adapter(torch.cat([h0, e], -1))
        for block in model.core:
            x = block(x, rope)
        torch.testing.assert_close(model.trunk(idx, model.steps(1)), x, atol=1e-5, rtol=1e-5)
        change_h0 = ((x - h0).norm(dim=-1) / x.norm(dim=-1))[0, -1].item()
        change_e = ((x - e).norm(dim=-1) / x.norm(dim=-1))[0, -1].item()
    assert abs(change_h0 - change_e) > 1e-3
    threshold = (change_h0 + change_e) / 2  # fires at loop 1 only if measured against h_0 and h_0 is closer
    cache = model.new_cache(4)
    with torch.no_grad():
        model(idx[:, :-1], loops=4, cache=cache)
        _, used = decode_with_exit(model, idx[:, -1:], model.steps(4), cache, ("latent", threshold), 1)
    assert (used.item() == 1) == (change_h0 < threshold)


PAPER_MODELS = {
    "huginn": dict(injection="concat", state_init="randn", block_norm="sandwich", norm_gains=True, init="huginn",
                   mlp="swiglu", qk_norm=False, tie_embeddings=True, rope_base=50000.0, n_prelude=2, n_coda=2),
    "parcae": dict(injection="diag", state_init="randn_small", norm_gains=True, init="parcae", tie_embeddings=True,
                   rope_base=50000.0, softcap=0.0),
    "ouro": dict(injection="none", norm_state=True, exit_gate=True, n_prelude=0, n_coda=0),
    "lti_flt": dict(injection="add", norm_state=True, n_prelude=0, n_coda=0),
    "flt_swa": dict(injection="full_attn", window_pattern="SL", n_core=3, n_prelude=0, n_coda=0),
    "loopformer": dict(modulation="loopformer", init="loopformer", mlp="gelu", mlp_ratio=2.5, qk_norm=False,
                       softcap=0.0, tie_embeddings=True),
}


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_paper_models_cached_decoding_equals_full_forward(name):
    model = randomize_extras(random_model(**PAPER_MODELS[name]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:  # gains away from 1, as after training
                p.uniform_(0.5, 1.5)
    idx = torch.randint(0, 61, (2, 20))
    for M in (1, 3, 5):
        full, _ = model(idx, loops=M)
        cache = model.new_cache(M)
        steps = [model(idx[:, :9], loops=M, cache=cache)[0], model(idx[:, 9:12], loops=M, cache=cache)[0]]
        steps += [model(idx[:, t:t + 1], loops=M, cache=cache)[0] for t in range(12, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("name", ["huginn", "parcae", "ouro"])
def test_paper_models_overfit_one_batch(name):
    torch.manual_seed(0)
    overfit(LoopGPT(small_config(**PAPER_MODELS[name])).train())
