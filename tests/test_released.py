"""
Released looped models (data/huggingface.py), offline: each test writes a small random
checkpoint in a family's own format (config keys and tensor names as the authors' modeling
code has them), loads it through init_from=hf:'s path, and holds loopgpt's logits against a
reference forward written here from that family's equations (float64), at several budgets.
Also: transformers-5 configs, the refusals, export and its round trip, memory-mapped loading.
"""

import json
import math
import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data.huggingface as hf  # noqa: E402
from loopgpt import LoopGPT, LoopGPTConfig  # noqa: E402
from test_hf import llama_config, random_weights, reference_logits, write_safetensors  # noqa: E402

V, D, H, T = 96, 32, 4, 12  # vocabulary, width, heads, tokens


def rand(g, *shape, std=0.3):
    return torch.randn(*shape, generator=g) * std


def gain(g, n=D):  # norm gains near 1, different per channel: a missed or misplaced gain shows
    return 1 + 0.3 * torch.randn(n, generator=g)


def write(folder, config, tensors, bin_file=False):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    if bin_file:  # Parcae's release: a torch pickle
        torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))
    else:
        write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    return str(folder)


def load(folder):
    model, _, _ = hf.model_from_hf(folder, dtype=torch.float32)
    return model


IDX = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(7))


# ---- the reference pieces, from the equations (float64) ----

def rms(x, g=None, eps=1e-6):
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if g is None else y * g


def rope(x, theta, adjacent):
    """RoPE on (B, H, T, hd): rotate pairs (2i, 2i+1) if adjacent (Huginn, Parcae), else
    (i, i + hd/2) (Llama's rotate_half), by angle pos * theta^(-2i/hd)."""
    hd = x.size(-1)
    ang = torch.arange(x.size(-2), dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = ang.cos(), ang.sin()
    a, b = (x[..., 0::2], x[..., 1::2]) if adjacent else (x[..., :hd // 2], x[..., hd // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return torch.stack([ra, rb], -1).flatten(-2) if adjacent else torch.cat([ra, rb], -1)


def attention(q, k, v, out_w):
    """Causal softmax attention over (B, H, T, hd) (K/V heads repeated for GQA), then out_w."""
    k, v = (z.repeat_interleave(q.size(1) // k.size(1), dim=1) for z in (k, v))
    scores = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return y @ out_w.T


def heads(x, n):
    return x.unflatten(-1, (n, -1)).transpose(1, 2)


def swiglu(x, fc, proj):
    gate, up = (x @ fc.T).chunk(2, -1)
    return (F.silu(gate) * up) @ proj.T


# ---- Ouro: the whole stack looped, branch norms, the final norm at every loop, an exit gate ----

def ouro_checkpoint(folder, layers=2, loops=3, n_kv=2, head_dim=None, vocab=V):
    g = torch.Generator().manual_seed(1)
    hd = head_dim or D // H
    V = vocab  # noqa: N806
    c = dict(model_type="ouro", architectures=["OuroForCausalLM"], vocab_size=V, eos_token_id=0, hidden_size=D, intermediate_size=48,
             num_hidden_layers=layers, num_attention_heads=H, num_key_value_heads=n_kv, head_dim=hd, rms_norm_eps=1e-6,
             rope_theta=1e6, max_position_embeddings=64, tie_word_embeddings=False, hidden_act="silu",
             total_ut_steps=loops, early_exit_threshold=1.0)
    t = {"model.embed_tokens.weight": rand(g, V, D), "model.norm.weight": gain(g), "lm_head.weight": rand(g, V, D),
         "model.early_exit_gate.weight": rand(g, 1, D), "model.early_exit_gate.bias": rand(g, 1)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"):
            t[p + n + ".weight"] = gain(g)
        t[p + "self_attn.q_proj.weight"] = rand(g, H * hd, D)
        t[p + "self_attn.k_proj.weight"], t[p + "self_attn.v_proj.weight"] = rand(g, n_kv * hd, D), rand(g, n_kv * hd, D)
        t[p + "self_attn.o_proj.weight"] = rand(g, D, H * hd)
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = rand(g, 48, D), rand(g, 48, D)
        t[p + "mlp.down_proj.weight"] = rand(g, D, 48)
    return write(folder, c, t), c, t


def ouro_reference(t, c, loops):
    """Per loop: (logits, exit probability λ). Each layer: x += n2(attn(n1 x)), x += n4(mlp(n3 x))
    with n2, n4 the *_2 norms on the branch outputs; after each loop x = norm(x), which the
    next loop, the gate σ(w x + b) and the head all read."""
    t = {k: v.double() for k, v in t.items()}
    eps, hd = c["rms_norm_eps"], c["head_dim"]
    x, out = t["model.embed_tokens.weight"][IDX], []
    for _ in range(loops):
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            a = rms(x, t[p + "input_layernorm.weight"], eps)
            q, k, v = (heads(a @ t[p + f"self_attn.{n}_proj.weight"].T, m) for n, m in
                       (("q", H), ("k", c["num_key_value_heads"]), ("v", c["num_key_value_heads"])))
            y = attention(rope(q, c["rope_theta"], False), rope(k, c["rope_theta"], False), v, t[p + "self_attn.o_proj.weight"])
            x = x + rms(y, t[p + "input_layernorm_2.weight"], eps)
            m = swiglu(rms(x, t[p + "post_attention_layernorm.weight"], eps),
                       torch.cat([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]]), t[p + "mlp.down_proj.weight"])
            x = x + rms(m, t[p + "post_attention_layernorm_2.weight"], eps)
        x = rms(x, t["model.norm.weight"], eps)
        lam = torch.sigmoid(x @ t["model.early_exit_gate.weight"].T + t["model.early_exit_gate.bias"])
        out.append((x @ t["lm_head.weight"].T, lam))
    assert hd * H != D or True
    return out


@pytest.mark.parametrize("head_dim", [None, 16])  # 16: a head dim twice d / heads (as Nanbeige's)
def test_ouro_loads_and_matches_its_equations_at_every_loop(tmp_path, head_dim):
    folder, c, t = ouro_checkpoint(tmp_path, head_dim=head_dim)
    model = load(folder)
    cfg = model.config
    assert (cfg.n_core, cfg.n_loops, cfg.block_norm, cfg.loop_norm_f, cfg.exit_gate) == (2, 3, "branch", True, True)
    ref = ouro_reference(t, c, 5)
    with torch.no_grad():
        budgets = dict(model.logits_at_budgets(IDX, [1, 2, 3, 5]))
        record = {}
        model.trunk(IDX, model.steps(5), record=record)
        from loopgpt import exit_probability
        lams = [exit_probability(model, s) for s in record["states"]]
    for M in (1, 2, 3, 5):  # the trained budget, fewer, and more
        assert ref[M - 1][0].std() > 0.5
        assert (budgets[M].double() - ref[M - 1][0]).abs().max() < 1e-4, M
        assert (lams[M - 1].double() - ref[M - 1][1]).abs().max() < 1e-5
    # the branch norms and the per-loop final norm each matter: without them the logits move
    for broken in (dict(block_norm="sandwich"), dict(loop_norm_f=False, norm_state=True)):
        other = LoopGPT(LoopGPTConfig(**{**cfg.to_dict(), **broken})).eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (other(IDX)[0].double() - ref[2][0]).abs().max() > 1e-2


def test_ouro_decodes_with_its_cache_and_gate_exit(tmp_path):
    import sample
    folder, c, t = ouro_checkpoint(tmp_path)
    model = load(folder)
    with torch.no_grad():
        full = model(IDX, loops=4)[0]
        cache = model.new_cache(4)
        steps = [model(IDX[:, :6], loops=4, cache=cache)[0]]
        steps += [model(IDX[:, i:i + 1], loops=4, cache=cache)[0] for i in range(6, T)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4
    used = []
    out = sample.generate(model, IDX[:1, :4], 6, loops=4, temperature=0, exit=("gate", 0.5), loops_used=used)
    assert out.shape == (1, 10) and all(1 <= u <= 4 for step in used for u in step)


# ---- Huginn-0125: sandwich blocks, adapter, sqrt(d) embedding, ln_f twice, q/k biases ----

def huginn_checkpoint(folder, state_init="like-init", both_copies=True):
    g = torch.Generator().manual_seed(2)
    c = dict(model_type="huginn_raven", architectures=["RavenForCausalLM"], n_embd=D, num_attention_heads=H,
             n_layers=4, block_size=64, vocab_size=V, padding_multiple=32, tie_embeddings=True, intermediate_size=40,
             bias=False, architecture_class_name="RecurrentGPT", block_class_name="SandwichBlock",
             norm_class_name="RMSNorm_llama", norm_eps=1e-6, mlp_class_name="GatedMLP", nonlin_name="SiLU",
             init_strategy="takase", state_init=state_init, injection_type="linear", n_layers_in_recurrent_block=2,
             mean_recurrence=3, mean_backprop_depth=2, n_layers_in_prelude=1, n_layers_in_coda=1, qk_bias=True,
             rope_base=50000)
    t = {"transformer.wte.weight": rand(g, V, D, std=0.05), "transformer.ln_f.weight": gain(g),
         "transformer.adapter.weight": rand(g, D, 2 * D, std=0.15), "freqs_cis": torch.zeros(1, 64, 1, D // H // 2, 2)}
    if both_copies:
        t["lm_head.weight"] = t["transformer.wte.weight"]
    for part, n in (("prelude", 1), ("core_block", 2), ("coda", 1)):
        for i in range(n):
            p = f"transformer.{part}.{i}."
            for j in range(1, 5):
                t[p + f"norm_{j}.weight"] = gain(g)
            t[p + "attn.Wqkv.weight"], t[p + "attn.qk_bias"] = rand(g, 3 * D, D), rand(g, 2, 1, H, D // H)
            t[p + "attn.proj.weight"] = rand(g, D, D)
            t[p + "mlp.fc.weight"], t[p + "mlp.proj.weight"] = rand(g, 80, D), rand(g, D, 40)
    return write(folder, c, t), c, t


def huginn_reference(t, c, loops, h0):
    """Embedding x sqrt(d); sandwich blocks x = n2(attn(n1 x) + x), x = n4(mlp(n3 x) + x);
    attention from Wqkv = [q; k; v] with q/k biases added before RoPE on adjacent pairs;
    state s = adapter([s; e]) then the core, M times from s = h0; ln_f, coda, ln_f, tied head."""
    t = {k: v.double() for k, v in t.items()}
    eps, theta = c["norm_eps"], c["rope_base"]

    def block(x, p):
        q, k, v = (x_ := rms(x, t[p + "norm_1.weight"], eps)) @ t[p + "attn.Wqkv.weight"].T, None, None
        q, k, v = q.split(D, -1)
        q = heads(q, H) + t[p + "attn.qk_bias"][0, 0][:, None, :]
        k = heads(k, H) + t[p + "attn.qk_bias"][1, 0][:, None, :]
        y = attention(rope(q, theta, True), rope(k, theta, True), heads(v, H), t[p + "attn.proj.weight"])
        x = rms(y + x, t[p + "norm_2.weight"], eps)
        return rms(swiglu(rms(x, t[p + "norm_3.weight"], eps), t[p + "mlp.fc.weight"], t[p + "mlp.proj.weight"]) + x,
                   t[p + "norm_4.weight"], eps)

    e = t["transformer.wte.weight"][IDX] * math.sqrt(D)
    e = block(e, "transformer.prelude.0.")
    s = h0.double().expand_as(e)
    for _ in range(loops):
        s = torch.cat([s, e], -1) @ t["transformer.adapter.weight"].T
        for i in range(2):
            s = block(s, f"transformer.core_block.{i}.")
    x = block(rms(s, t["transformer.ln_f.weight"], eps), "transformer.coda.0.")
    return rms(x, t["transformer.ln_f.weight"], eps) @ t["transformer.wte.weight"].T


@pytest.mark.parametrize("state_init, both_copies", [("zero", True), ("like-init", False)])
def test_huginn_loads_and_matches_its_equations(tmp_path, state_init, both_copies):
    folder, c, t = huginn_checkpoint(tmp_path, state_init, both_copies)
    model = load(folder)
    cfg = model.config
    assert (cfg.embed_scale, cfg.coda_norm, cfg.qkv_bias, cfg.injection) == (math.sqrt(D), True, True, "concat")
    assert model.lm_head.weight is model.wte.weight  # tied, whether the file held one copy or two
    # the initial state: zero, or Huginn's random one (a fixed draw at inference, so read it off the model)
    h0 = torch.zeros(T, D) if state_init == "zero" else model.state_noise[:T]
    assert state_init == "zero" or 0.5 < h0.pow(2).mean().sqrt() < 0.7  # trunc. normal x sqrt(d): RMS ≈ 0.62
    # (random sandwich blocks amplify float32's rounding loop after loop, 1e-3 by loop 6: the
    # deeper budgets are compared in float64, where only RoPE's float32 tables differ)
    with torch.no_grad():
        budgets = dict(model.logits_at_budgets(IDX, [1, 2]))
        budgets64 = dict(model.double().logits_at_budgets(IDX, [1, 3, 6]))
        model.float()
    for M in (1, 2):
        assert (budgets[M].double() - huginn_reference(t, c, M, h0)).abs().max() < 1e-4, M
    for M in (1, 3, 6):
        ref = huginn_reference(t, c, M, h0)
        assert ref.std() > 0.2 and (budgets64[M].double() - ref).abs().max() < 1e-4, M
    # each Huginn convention, undone, shows: the ln_f before the coda, the embedding scale
    for broken in (dict(coda_norm=False), dict(embed_scale=1.0)):
        other = LoopGPT(LoopGPTConfig(**{**cfg.to_dict(), **broken})).eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (other(IDX, loops=3)[0].double() - huginn_reference(t, c, 3, h0)).abs().max() > 1e-2


# ---- Parcae: diagonal injection, ln_prelude, C, QK-norm, 0.5 relu², value embeddings ----

def parcae_checkpoint(folder, init_strategy="scaled-zero"):
    g = torch.Generator().manual_seed(3)
    c = dict(_class_name="ParcaeConfig", name="parcae-tiny", block_size=64, vocab_size=90, padding_multiple=32,
             padded_vocab_size=V, n_embd=D, intermediate_size=64, num_attention_heads=H, num_key_value_heads=2,
             rope_settings=dict(use_rope=True, rope_condense_ratio=1, rope_base=50000), bias=False, qk_bias=False,
             block_class_name="TransformerPreNormBlock", norm_class_name="RMSNorm", norm_eps=1e-5,
             mlp_class_name="BaseMLP", nonlin_name="ReLU2", qk_norm=True, logit_softcap=None, prelude_norm=True,
             init_strategy=init_strategy, injection_type="diagonal", state_init="like-init",
             recurrent_embedding_dimension=D, recurrent_intermediation_embedding_dimension=64,
             n_layers_in_recurrent_block=2, n_layers_in_prelude=1, n_layers_in_coda=2, mean_recurrence=3,
             mean_backprop_depth=2, tie_embeddings=True, architecture_class_name="Parcae")
    kv = 2 * (D // H)
    t = {"transformer.wte.weight": rand(g, V, D), "transformer.ln_f.weight": gain(g),
         "transformer.ln_prelude.weight": gain(g), "transformer.adapter.A_log": rand(g, D),
         "transformer.adapter.dt_bias": rand(g, D), "transformer.adapter.B": rand(g, D, D, std=0.2),
         "transformer.C.weight": rand(g, D, D, std=0.2), "freqs_cis": torch.zeros(1, 64, 1, D // H // 2, 2),
         "lm_head.weight": None}
    t["lm_head.weight"] = t["transformer.wte.weight"]
    # tables on blocks 1, 2 and 4 (of prelude 0, core 1-2, coda 3-4); gates on blocks 0, 2, 4:
    # the embedding enters where both exist (blocks 2 and 4), the others are stored but unused
    for i in (1, 2, 4):
        t[f"value_embeds.{i}.weight"] = rand(g, V, kv)
    for b, (part, i) in enumerate([("prelude", 0), ("core_block", 0), ("core_block", 1), ("coda", 0), ("coda", 1)]):
        p = f"transformer.{part}.{i}."
        t[p + "norm_1.weight"], t[p + "norm_2.weight"] = gain(g), gain(g)
        t[p + "attn.c_q.weight"], t[p + "attn.c_proj.weight"] = rand(g, D, D), rand(g, D, D)
        t[p + "attn.c_k.weight"], t[p + "attn.c_v.weight"] = rand(g, kv, D), rand(g, kv, D)
        if b in (0, 2, 4):
            t[p + "attn.ve_gate.weight"] = rand(g, 2, 32, std=1.0)
        t[p + "mlp.fc.weight"], t[p + "mlp.proj.weight"] = rand(g, 64, D), rand(g, D, 64)
    return write(folder, c, t, bin_file=True), c, t


def parcae_reference(t, c, loops, h0, logit_scale=1.0, embed_scale=1.0):
    """e = prelude(wte[ids] x scale), then ln_prelude; s = Ā ⊙ s + Δ ⊙ (e Bᵀ), Δ = softplus(dt_bias),
    Ā = exp(-Δ exp(A_log)), then the core, M times from h0; C; coda; ln_f; head x logit scale.
    Blocks: pre-norm, QK-norm after adjacent-pair RoPE, v += 2σ(W_g x[:, :32]) VE_i[ids] where
    block i has a table and a gate, MLP 0.5 relu(x)²."""
    t = {k: v.double() for k, v in t.items()}
    eps, theta = c["norm_eps"], 50000.0

    def block(x, p, b):
        a = rms(x, t[p + "norm_1.weight"], eps)
        q, k, v = heads(a @ t[p + "attn.c_q.weight"].T, H), heads(a @ t[p + "attn.c_k.weight"].T, 2), a @ t[p + "attn.c_v.weight"].T
        if f"value_embeds.{b}.weight" in t and p + "attn.ve_gate.weight" in t:
            gate = 2 * torch.sigmoid(a[..., :32] @ t[p + "attn.ve_gate.weight"].T)  # (B, T, 2)
            v = v + (gate[..., None] * t[f"value_embeds.{b}.weight"][IDX].unflatten(-1, (2, -1))).flatten(-2)
        q, k = rms(rope(q, theta, True), eps=1e-12), rms(rope(k, theta, True), eps=1e-12)
        x = x + attention(q, k, heads(v, 2), t[p + "attn.c_proj.weight"])
        m = rms(x, t[p + "norm_2.weight"], eps) @ t[p + "mlp.fc.weight"].T
        return x + (0.5 * F.relu(m) ** 2) @ t[p + "mlp.proj.weight"].T

    e = block(t["transformer.wte.weight"][IDX] * embed_scale, "transformer.prelude.0.", 0)
    e = rms(e, t["transformer.ln_prelude.weight"], eps)
    dt = F.softplus(t["transformer.adapter.dt_bias"])
    decay = torch.exp(-dt * torch.exp(t["transformer.adapter.A_log"]))
    s = h0.double().expand_as(e)
    for _ in range(loops):
        s = decay * s + dt * (e @ t["transformer.adapter.B"].T)
        s = block(block(s, "transformer.core_block.0.", 1), "transformer.core_block.1.", 2)
    x = s @ t["transformer.C.weight"].T
    x = block(block(x, "transformer.coda.0.", 3), "transformer.coda.1.", 4)
    return rms(x, t["transformer.ln_f.weight"], eps) @ t["transformer.wte.weight"].T * logit_scale


@pytest.mark.parametrize("init_strategy", ["scaled-zero", "takase-scaled"])
def test_parcae_loads_and_matches_its_equations(tmp_path, init_strategy):
    folder, c, t = parcae_checkpoint(tmp_path, init_strategy)
    model = load(folder)
    cfg = model.config
    assert (cfg.vocab_size, cfg.value_embeds, cfg.injection, cfg.qk_norm, cfg.mlp) == (V, "2,4", "diag", True, "relu2")
    h0 = model.state_noise[:T]  # Parcae's random state without the sqrt(d): RMS ≈ sqrt(2/(5d))
    assert abs(h0.pow(2).mean().sqrt().item() / math.sqrt(2 / (5 * D)) - 0.88) < 0.15
    scales = dict(embed_scale=math.sqrt(D), logit_scale=math.sqrt(2 / 5) / math.sqrt(D)) if init_strategy == "takase-scaled" else {}
    with torch.no_grad():
        budgets = dict(model.logits_at_budgets(IDX, [1, 3, 5]))
    for M in (1, 3, 5):
        ref = parcae_reference(t, c, M, h0, **scales)
        assert ref.std() > 0.05 and (budgets[M].double() - ref).abs().max() < 2e-4 * ref.abs().max(), M
    # the value embeddings matter: without them the logits move
    no_ve = dict(t)
    for i in (2, 4):
        no_ve[f"value_embeds.{i}.weight"] = torch.zeros_like(t[f"value_embeds.{i}.weight"])
    assert (budgets[3].double() - parcae_reference(no_ve, c, 3, h0, **scales)).abs().max() > 1e-2 * budgets[3].abs().max()
    with torch.no_grad():  # and the cached decoding is exact with them
        cache = model.new_cache(3)
        steps = [model(IDX[:, :5], loops=3, cache=cache)[0]] + [model(IDX[:, i:i + 1], loops=3, cache=cache)[0]
                                                               for i in range(5, T)]
        assert (torch.cat(steps, 1) - model(IDX, loops=3)[0]).abs().max() < 1e-4 * budgets[3].abs().max()


# ---- Llama family: Nanbeige's looped Llama, transformers 5's rope_parameters ----

def test_nanbeige_loops_the_stack_with_the_final_norm_at_each_boundary(tmp_path):
    c = {**llama_config(tie=False, layers=2), "model_type": "nanbeige", "num_loops": 2, "head_dim": 16}
    g = torch.Generator().manual_seed(4)
    t = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in random_weights(c).items()}
    for i in range(2):  # head_dim 16, twice hidden / heads: q, k, v, o are wider than d
        p = f"model.layers.{i}.self_attn."
        t[p + "q_proj.weight"], t[p + "o_proj.weight"] = rand(g, 4 * 16, 32), rand(g, 32, 4 * 16)
        t[p + "k_proj.weight"], t[p + "v_proj.weight"] = rand(g, 2 * 16, 32), rand(g, 2 * 16, 32)
    model = load(write(tmp_path, c, t))
    assert (model.config.n_loops, model.config.head_dim, model.config.loop_norm_f) == (2, 16, True)
    td = {k: v.double() for k, v in t.items()}
    ids = IDX % 320
    x = td["model.embed_tokens.weight"][ids]
    refs = []
    for _ in range(3):  # each loop: the Llama layers, then the final norm (the next loop's input)
        for i in range(2):
            p = f"model.layers.{i}."
            a = rms(x, td[p + "input_layernorm.weight"], 1e-5)
            q, k, v = (heads(a @ td[p + f"self_attn.{n}_proj.weight"].T, m) for n, m in (("q", 4), ("k", 2), ("v", 2)))
            x = x + attention(rope(q, 5000.0, False), rope(k, 5000.0, False), v, td[p + "self_attn.o_proj.weight"])
            fc = torch.cat([td[p + "mlp.gate_proj.weight"], td[p + "mlp.up_proj.weight"]])
            x = x + swiglu(rms(x, td[p + "post_attention_layernorm.weight"], 1e-5), fc, td[p + "mlp.down_proj.weight"])
        x = rms(x, td["model.norm.weight"], 1e-5)
        refs.append(x @ td["lm_head.weight"].T)
    with torch.no_grad():
        for M, logits in model.logits_at_budgets(ids, [1, 2, 3]):
            assert (logits.double() - refs[M - 1]).abs().max() < 1e-4, M
    with pytest.raises(ValueError, match="enable_depth_attention=True"):
        hf.model_keys({**c, "enable_depth_attention": True})


def test_a_transformers_5_config_reads_its_rope_parameters(tmp_path):
    c = llama_config()
    t = random_weights(c)
    c5 = {k: v for k, v in c.items() if k != "rope_theta"}
    c5["rope_parameters"] = {"rope_theta": c["rope_theta"], "rope_type": "default"}
    model = load(write(tmp_path, c5, t))
    assert model.config.rope_base == c["rope_theta"]
    with torch.no_grad():
        assert (model(IDX[:, :10] % 320)[0].double() - reference_logits(t, c, IDX[:, :10] % 320)).abs().max() < 2e-5
    for params in ({"rope_theta": 1e4, "rope_type": "llama3", "factor": 8.0}, {"rope_type": "dynamic", "factor": 2.0}):
        with pytest.raises(ValueError, match=f"rope_type='{params['rope_type']}'"):
            hf.model_keys({**c5, "rope_parameters": params})


@pytest.mark.parametrize("config, message", [
    ({"model_type": "qwen3", "attention_bias": True}, "attention_bias=True"),
    ({"model_type": "olmo2"}, "not OLMo-2"),
    ({"model_type": "ouro", "rope_scaling": {"type": "yarn"}}, "rope_type='yarn'"),
    ({"model_type": "huginn_raven", "block_class_name": "PreNormBlock"}, "block_class_name='PreNormBlock'"),
    ({"model_type": "huginn_raven", "injection_type": "add"}, "injection_type='add'"),
    ({"_class_name": "ParcaeConfig", "n_embd": 32, "num_attention_heads": 4, "intermediate_size": 64,
      "init_strategy": "bernstein"}, "init_strategy='bernstein'"),
    ({"_class_name": "ParcaeConfig", "n_embd": 32, "num_attention_heads": 4, "intermediate_size": 64,
      "recurrent_embedding_dimension": 64}, "recurrent_embedding_dimension=64"),
])
def test_what_loopgpt_cannot_express_is_refused_in_one_line(config, message):
    base = {**llama_config(), **config} if "model_type" in config and config["model_type"] in ("ouro", "qwen3", "olmo2") \
        else config
    with pytest.raises(ValueError, match=message) as e:
        hf.model_keys(base)
    assert "\n" not in str(e.value)


# ---- export: loopgpt's layout round-trips any model; Llama's holds a plain stack ----

EXPORTED = {
    "flt": dict(n_prelude=0, n_core=2, n_coda=0, injection="full_attn", n_loops=3),
    "huginn-like": dict(injection="concat", block_norm="sandwich", state_init="randn", norm_gains=True, embed_scale=2.0,
                        coda_norm=True, qkv_bias=True, init="huginn", tie_embeddings=True),
    "parcae-like": dict(injection="diag", state_init="randn_small", norm_gains=True, value_embeds="0,2", n_kv_head=2),
    "ouro-like": dict(n_prelude=0, n_coda=0, block_norm="branch", loop_norm_f=True, exit_gate=True, norm_gains=True,
                      head_dim=48),
    "lora+tmlt": dict(modulation="tmlt", lora_rank=2),
}


@pytest.mark.parametrize("name", EXPORTED)
def test_export_round_trips_bit_for_bit(tmp_path, name):
    torch.manual_seed(0)
    model = LoopGPT(LoopGPTConfig(vocab_size=V, block_size=32, n_embd=D * 2, n_head=H, **EXPORTED[name])).eval()
    with torch.no_grad():
        for p in model.parameters():  # nothing left at a zero or identity init
            p.add_(torch.randn_like(p) * 0.05)
    hf.export(model, str(tmp_path / "out"))
    again = load(str(tmp_path / "out"))
    assert again.config == model.config
    with torch.no_grad():
        assert torch.equal(again(IDX % V, loops=2)[0], model(IDX % V, loops=2)[0])


def test_a_plain_model_exports_as_llama_and_reads_back(tmp_path):
    torch.manual_seed(0)
    keys = dict(vocab_size=V, block_size=32, n_embd=D, n_head=H, n_kv_head=2, n_prelude=1, n_core=2, n_coda=1,
                n_loops=1, norm_gains=True, norm_eps=1e-5, embed_norm=False, qk_norm=False, mlp="swiglu", mlp_ratio=2.5,
                softcap=0.0, tie_embeddings=False)
    model = LoopGPT(LoopGPTConfig(**keys)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.export(model, str(tmp_path / "llama"), layout="llama")
    with open(tmp_path / "llama" / "config.json") as f:
        c = json.load(f)
    assert c["model_type"] == "llama" and c["num_hidden_layers"] == 4
    t = hf.read_safetensors(str(tmp_path / "llama" / "model.safetensors"))
    with torch.no_grad():  # the equations' Llama on the exported tensors gives our logits
        assert (model(IDX)[0].double() - reference_logits(t, c, IDX)).abs().max() < 2e-5
    again = load(str(tmp_path / "llama"))
    with torch.no_grad():
        assert torch.equal(again(IDX)[0], model(IDX)[0])
    looped = LoopGPT(LoopGPTConfig(**{**keys, "n_loops": 2, "injection": "add"}))
    with pytest.raises(ValueError, match="n_loops=2.*injection='add'.*layout='loopgpt'"):
        hf.export(looped, str(tmp_path / "no"), layout="llama")


def test_weights_are_memory_mapped_in_their_dtype(tmp_path):
    c = llama_config()
    t = {k: v.to(torch.bfloat16) for k, v in random_weights(c).items()}
    folder = write(tmp_path, c, t)
    keys, sd, _ = hf.load_model(folder)
    assert sd["core.0.attn.q.weight"].dtype == torch.bfloat16
    assert torch.equal(sd["core.0.attn.q.weight"], t["model.layers.0.self_attn.q_proj.weight"])
    model = hf.build_model(keys, sd)  # built on the meta device: no random init, the file's dtype
    assert model.wte.weight.dtype == torch.bfloat16 and model.lm_head.weight is model.wte.weight
    assert model.rope_cos.device.type == "cpu" and model.num_params() == sum(v.numel() for v in t.values())


# ---- through the scripts, as a user runs them ---------------------------------------------------

from test_eval import write_tasks  # noqa: E402
from test_hf import tokenizer_json  # noqa: E402
from test_train import SMALL, records, run  # noqa: E402
from test_train import data_dir  # noqa: E402,F401  (the module-scoped prepared corpus)


@pytest.fixture(scope="module")
def ouro_folder(tmp_path_factory):
    folder, _, _ = ouro_checkpoint(tmp_path_factory.mktemp("ouro"), vocab=320)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json()[0], f)
    return folder


def test_sample_and_eval_a_released_model(ouro_folder, tmp_path):
    p = run("sample.py", f"--init_from=hf:{ouro_folder}", "--budgets=1,3,5", "--max_new_tokens=6", "--start=def f",
            "--temperature=0")
    assert f"hf:{ouro_folder}: " in p.stdout and all(f"━━━ M={M} " in p.stdout for M in (1, 3, 5))
    p = run("sample.py", f"--init_from=hf:{ouro_folder}", "--budgets=4", "--max_new_tokens=6", "--exit=gate:0.5")
    assert "[exit gate:0.5] loops per token" in p.stdout
    write_tasks(tmp_path)
    p = run("eval.py", f"--init_from=hf:{ouro_folder}", f"--data_dir={tmp_path}", "--tasks=core", "--budgets=1,2,3",
            f"--out_dir={tmp_path / 'ev'}", "--plot=False")
    record = json.loads((tmp_path / "ev" / "eval.jsonl").read_text().splitlines()[-1])
    assert record["step"] is None and set(record["results"]) == {"mc", "schema", "lm", "CORE"}
    assert record["title"].startswith(f"hf:{ouro_folder} (L=3")
    for args, message in (([f"--init_from={ouro_folder}"], "give hf:NAME"),
                          (["--init_from=hf:/nonexistent/x/y"], "neither a folder nor a hub id"),
                          ([f"--init_from=hf:{ouro_folder}", "--budgets=0"], "budget")):
        p = run("sample.py", *args, ok=False)
        assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = run("eval.py", f"--init_from=hf:{ouro_folder}", "--tasks=bpb", f"--out_dir={tmp_path / 'ev'}", ok=False)
    assert "--tasks=bpb" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_fine_tune_a_released_looped_model(ouro_folder, tmp_path):
    run("data/pydoc/prepare.py", f"--tokenizer=hf:{ouro_folder}", f"--out_dir={tmp_path / 'data'}")
    p = run("train.py", f"--init_from=hf:{ouro_folder}", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'ft'}",
            "--block_size=32", "--batch_size=2", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
            "--eval_budgets=1,3")
    assert f"initialised from hf:{ouro_folder}" in p.stdout and "the same" in p.stdout
    evals = records(tmp_path / "ft", "eval")
    assert [e["step"] for e in evals] == [0, 2] and all(math.isfinite(e["val"]["3"]["loss"]) for e in evals)


def test_export_a_trained_run_and_read_it_back(data_dir, tmp_path):
    out = tmp_path / "run"
    run("train.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", *SMALL)
    p = run("export.py", f"--out_dir={out}", f"--to={tmp_path / 'hub'}")
    assert "loopgpt layout" in p.stdout
    same = ["--budgets=1,3", "--max_new_tokens=8", "--temperature=0", "--start=def "]
    a = run("sample.py", f"--out_dir={out}", *same).stdout
    b = run("sample.py", f"--init_from=hf:{tmp_path / 'hub'}", *same).stdout
    texts = lambda out: re.findall(r"━━━ (M=\d+) [^\n]*\n(.*?)\n\n", out, re.S)  # noqa: E731  (route, its text)
    assert len(texts(a)) == 2 and texts(a) == texts(b)
    p = run("export.py", f"--out_dir={out}", f"--to={tmp_path / 'llama'}", "--layout=llama", ok=False)
    assert "layout='loopgpt'" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_a_gated_or_missing_download_says_why_in_one_line(tmp_path, monkeypatch):
    import http.server
    import threading

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # a gated repository without a token, and a missing one
            self.send_error(401 if "gated" in self.path else 404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(hf, "HF_DIR", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        for name, message in (("org/gated", "HTTP 401 Unauthorized (a gated or private repository: accept its terms "
                                            "on the hub and set HF_TOKEN)"), ("org/missing", "HTTP 404 Not Found")):
            with pytest.raises(SystemExit) as e:
                hf.hf_folder(name)
            assert str(e.value).endswith(message) and "\n" not in str(e.value)
    finally:
        server.shutdown()
