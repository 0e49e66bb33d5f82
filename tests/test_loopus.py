"""LoopUS (Park et al. 2026, arXiv 2605.11011): the selective gate, the confidence head and its
exit, L_Mono, each against a hand computation; and the recurrence curriculum of McLeish et al."""

import math

import pytest
import torch
import torch.nn.functional as F

from loopgpt import LoopGPT, LoopGPTConfig
from sample import generate
from train import Objective
from test_kv_sharing import decode
from test_model import random_model
from test_train import SMALL, data_dir, records, run  # noqa: F401  (data_dir: the prepared corpus)


def loopus_model(seed=0, **kw):
    model = random_model(seed, injection="none", selective_gate=True, confidence_head=True, **kw)
    with torch.no_grad():  # a confidence head that says different things for different tokens
        model.confidence.weight.normal_(std=1.0)
    return model


def test_selective_gate_is_a_convex_step_towards_the_proposal():
    model = loopus_model()
    idx = torch.randint(0, 61, (2, 12))
    record = {}
    with torch.no_grad():
        model.trunk(idx, model.steps(3), record=record)
        states, updates = record["states"], record["updates"]
        e, h0 = model.loop_input(idx, (model.rope_cos[:12], model.rope_sin[:12]), None)
        x = h0
        for t in range(3):
            f = model.core_pass(x, e, t, (model.rope_cos[:12], model.rope_sin[:12]), None, 1)
            # by hand: Δ = softplus(W_up W_down (f - x) + b), Ā = exp(-Δ exp(A_log))
            dt = F.softplus((f - x) @ model.gate_down.weight.T @ model.gate_up.weight.T + model.gate_up.bias)
            a = torch.exp(-dt * torch.exp(model.gate_A_log))
            assert 0 < a.min() and a.max() < 1 and a.std() > 0.01  # per token and channel, inside (0, 1)
            torch.testing.assert_close(updates[t], f - x)
            x = a * f + (1 - a) * x
            torch.testing.assert_close(states[t], x, atol=1e-6, rtol=1e-5)


def test_gate_init_follows_the_loopus_code():
    model = LoopGPT(LoopGPTConfig(vocab_size=61, block_size=8, n_embd=64, n_head=4, selective_gate=True))
    assert model.gate_down.out_features == 4  # rank ceil(d / 16)
    torch.testing.assert_close(model.gate_A_log.exp(), torch.arange(1, 65, dtype=torch.float32))
    dt = F.softplus(model.gate_up.bias)  # the step size at a zero update: log-uniform in [0.001, 0.1]
    assert 1e-3 * 0.999 <= dt.min() and dt.max() <= 0.1 * 1.001 and dt.std() > 0.01


@pytest.mark.parametrize("M", [1, 3, 5])
def test_cached_decoding_with_the_gate_equals_the_full_forward(M):
    model = loopus_model()
    idx = torch.randint(0, 61, (2, 14))
    full, _ = model(idx, loops=M)
    torch.testing.assert_close(decode(model, idx, M, prefill=6)[0], full, atol=1e-5, rtol=1e-5)
    plain = random_model(injection="none")  # the same weights without the gate compute something else
    plain.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(plain(idx, loops=M)[0], full, atol=1e-3)


def test_losses_by_hand():
    model = loopus_model(bptt_k=2).train()
    idx = torch.randint(0, 61, (2, 12))
    y = torch.randint(0, 61, (2, 12))
    y[0, :3] = -1  # ignored positions
    valid = (y != -1).flatten()

    def coda_logits(x):
        return model.logits(model.norm_f(model.run_coda(x)))

    for M, lam in ((4, 0.0), (4, 0.7), (2, 0.7)):
        torch.manual_seed(0)
        loss = Objective(model, lambda_mono=lam)(idx, y, loops=M)
        record = {}
        logits = model.logits(model.norm_f(model.trunk(idx, model.steps(M), record=record)))
        states, updates = record["states"], record["updates"]
        ce = F.cross_entropy(logits.view(-1, 61), y.flatten(), ignore_index=-1)
        right = (logits.argmax(-1).flatten() == y.flatten()).float()
        q = model.confidence(F.layer_norm(updates[-1], (32,), model.confidence_norm.weight,
                                          model.confidence_norm.bias)).flatten()
        bce = -(right * F.logsigmoid(q) + (1 - right) * F.logsigmoid(-q))[valid].mean()
        expected = ce + bce
        if lam and M > 2:  # L_Mono against the state 2 loops back, where the gradient window starts
            ce_start = F.cross_entropy(coda_logits(states[M - 3]).view(-1, 61), y.flatten(), ignore_index=-1)
            expected = expected + lam * (ce - ce_start) * torch.sigmoid(ce - ce_start)
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_confidence_exit():
    model = loopus_model()
    prompt = torch.randint(0, 61, (2, 5))
    for bias, expected in ((50.0, 2), (-50.0, 5)):  # always sure: stop at min_loops; never: every loop
        with torch.no_grad():
            model.confidence.bias.fill_(bias)
        used = []
        out = generate(model, prompt, 4, loops=5, temperature=0, exit=("confidence", 0.6), min_loops=2, loops_used=used)
        assert all(u == [expected] * 2 for u in used)
        if expected == 5:  # never sure: the exit decoder runs the gated loop as the plain decoder does
            assert torch.equal(out, model.generate(prompt, 4, loops=5, temperature=0))
    # a threshold between: the loops used follow σ(q) of the last position's update
    with torch.no_grad():
        model.confidence.bias.zero_()
    used = []
    generate(model, prompt, 6, loops=5, temperature=0, exit=("confidence", 0.5), loops_used=used)
    assert len({u for step in used for u in step}) > 1
    with pytest.raises(ValueError, match="confidence_head=True"):
        generate(random_model(), prompt, 2, exit=("confidence", 0.5))


def test_train_loopus_recipe_and_recurrence_curriculum(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--max_iters=8", "--eval_interval=8", *SMALL]
    # the recurrence curriculum: over the first half of the steps the depth grows 1 -> n_loops
    run("train.py", f"--out_dir={tmp_path / 'c'}", "--recurrence_warmup=0.5", *common, "--n_loops=4")
    loops = [r["loops"] for r in records(tmp_path / "c", "train")]
    assert loops == [max(1, math.ceil(4 * s / 4)) if s < 4 else 4 for s in range(8)] == [1, 1, 2, 3, 4, 4, 4, 4]
    run("train.py", f"--out_dir={tmp_path / 's'}", "--recurrence_warmup=0.5", "--recurrence_schedule=1-sqrt",
        *common, "--n_loops=4")
    loops = [r["loops"] for r in records(tmp_path / "s", "train")]
    assert loops == [max(1, math.ceil(4 * (1 - math.sqrt(1 - s / 4)))) if s < 4 else 4 for s in range(8)]
    # LoopUS: gate and head, random depth with a 2-loop gradient window, L_Mono, frozen embedding and prelude
    out = tmp_path / "u"
    p = run("train.py", f"--out_dir={out}", "--injection=none", "--selective_gate=True", "--confidence_head=True",
            "--loop_sampling=uniform", "--loop_max=4", "--bptt_k=2", "--lambda_mono=1.0", "--freeze=wte,prelude",
            "--sweep_exits=confidence:0.6", *common)
    assert "selective_gate=True, confidence_head=True" in p.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.manual_seed(1337)  # train.py's seed: the same init, where the frozen ones still are
    first = LoopGPT(LoopGPTConfig(**ckpt["model_config"]))
    for name, p in first.state_dict().items():
        moved = not torch.equal(p, ckpt["model"][name])
        assert moved == (not name.startswith(("wte", "prelude")) and name not in ("rope_cos", "rope_sin")) or \
            not moved and torch.count_nonzero(p) == 0, name
    for bad, message in (("--freeze=nothing", "no parameter is named nothing"),
                         ("--recurrence_schedule=cubic", "valid: linear, 1-sqrt"),
                         ("--sweep_exits=confidence:0.5", "confidence_head=True")):
        p = run("train.py", f"--out_dir={tmp_path / 'bad'}", bad, *common, ok=False)
        assert message in p.stderr
