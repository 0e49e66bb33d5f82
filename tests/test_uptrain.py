"""Initialising a looped model from a pretrained plain one (loopgpt.init_from_source):
which source layer each block starts from, exact reproduction where nothing is shared,
the per-loop LoRA's SVD init (its error is the truncated singular values' energy), and the
errors for sources and shapes that cannot be converted."""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loopgpt import LORA_MATRIX, LoopGPT, LoopGPTConfig, init_from_source, layer_similarity, norm  # noqa: E402


def model(seed=0, **kw):
    """A random model whose output projections are not zero, so every block really acts."""
    base = dict(vocab_size=61, block_size=16, n_embd=32, n_head=4, n_prelude=0, n_core=8, n_coda=0, n_loops=1)
    torch.manual_seed(seed)
    m = LoopGPT(LoopGPTConfig(**{**base, **kw}))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(std=0.3 / math.sqrt(p.size(1)))
    return m.eval()


IDX = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kw", [dict(n_prelude=1, n_core=6, n_coda=1), dict(n_prelude=2, n_core=3, n_coda=3),
                                dict(n_prelude=1, n_core=6, n_coda=1, injection="add"),
                                dict(n_prelude=1, n_core=6, n_coda=1, injection="full_attn")])
@pytest.mark.parametrize("init_core", ["lower", "stepwise", "average"])
def test_no_sharing_reproduces_the_source(kw, init_core):
    # one loop over all the replaced layers: nothing is shared, so the converted model is
    # the source (at M = 1 every injection is a plain pass of the core)
    source, target = model(), model(seed=5, **kw)
    init_from_source(target, source, init_core)
    torch.testing.assert_close(target(IDX, loops=1)[0], source(IDX)[0], atol=1e-5, rtol=1e-5)


def test_which_layer_each_core_block_starts_from():
    source = model()  # S_0 .. S_7
    S = [b.attn.q.weight for b in source.core]
    for init_core, expected in (("lower", [S[1], S[2]]),                         # the first loop's layers
                                ("stepwise", [S[1], S[6]]),                      # evenly spaced, first and last
                                ("average", [(S[1] + S[3] + S[5]) / 3, (S[2] + S[4] + S[6]) / 3])):
        target = model(seed=5, n_prelude=1, n_core=2, n_coda=1, n_loops=3)
        init_from_source(target, source, init_core)
        for block, w in zip(target.core, expected):
            torch.testing.assert_close(block.attn.q.weight, w)
        torch.testing.assert_close(target.prelude[0].mlp.fc.weight, source.core[0].mlp.fc.weight)
        torch.testing.assert_close(target.coda[0].mlp.fc.weight, source.core[7].mlp.fc.weight)
        torch.testing.assert_close(target.wte.weight, source.wte.weight)
        torch.testing.assert_close(target.lm_head.weight, source.lm_head.weight)


def test_a_looped_source_unrolls_into_its_layers():
    source = model(n_core=2, n_loops=4)  # 2 blocks x 4 loops, no injection: 8 layers
    target = model(seed=5)               # a plain 8-layer stack
    init_from_source(target, source)
    torch.testing.assert_close(target(IDX)[0], source(IDX)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r, targets", [(1, "q,v"), (4, "q,v"), (32, "q,v"), (3, "all"), (32, "all")])
def test_lora_svd_init_is_the_best_rank_r_approximation(r, targets):
    source = model(mlp="swiglu", n_kv_head=2)
    target = model(seed=5, mlp="swiglu", n_kv_head=2, n_prelude=1, n_core=2, n_coda=1, n_loops=3, lora_rank=r,
                   lora_targets=targets)
    errors = init_from_source(target, source, "average")
    names = ["q", "k", "v", "o", "fc", "down"] if targets == "all" else ["q", "v"]
    assert sorted(errors) == sorted(f"lora_{n}" for n in names)
    for which in names:
        for t in range(3):
            for j in range(2):
                W = LORA_MATRIX[which](source.core[1 + 2 * t + j]).weight
                lora = LORA_MATRIX[which](target.core[j])
                shared = lora.weight
                approx = shared + lora.lora_B[t] @ lora.lora_A[t]
                # Eckart-Young: the error is the energy of the dropped singular values
                tail = torch.linalg.svdvals(W - shared)[r:].pow(2).sum()
                torch.testing.assert_close((W - approx).pow(2).sum(), tail, atol=1e-5, rtol=1e-4)
                assert errors[f"lora_{which}"][2 * t + j] == pytest.approx((tail / W.pow(2).sum()).item(), rel=1e-4)
                if r < 32:
                    assert tail > 1e-3  # a real truncation, not a vacuous one
    if r == 32:  # full rank: every target matrix is the source layer's
        assert max(max(e) for e in errors.values()) < 1e-10


def test_full_rank_lora_on_every_matrix_reproduces_the_source():
    # Relaxed Recursive's claim at its limit, with its LoRA on every linear of the block: the
    # shared block plus each loop's LoRA is the layer it replaces (norms hold no weights here)
    source = model()
    target = model(seed=5, n_prelude=1, n_core=2, n_coda=1, n_loops=3, lora_rank=32, lora_targets="all")
    init_from_source(target, source, "average")
    torch.testing.assert_close(target(IDX, loops=3)[0], source(IDX)[0], atol=1e-4, rtol=1e-4)
    qv = model(seed=5, n_prelude=1, n_core=2, n_coda=1, n_loops=3, lora_rank=32)
    init_from_source(qv, source, "average")
    assert not torch.allclose(qv(IDX, loops=3)[0], source(IDX)[0], atol=1e-3)  # q and v alone cannot


def test_full_rank_lora_reproduces_a_source_whose_layers_differ_in_q_and_v_only():
    # Relaxed Recursive's claim at its limit: the shared block plus each loop's LoRA is the
    # layer it replaces, so the converted model computes what the source computed
    source = model()
    with torch.no_grad():
        for t in range(1, 3):
            for j in range(2):
                src, dst = source.core[1 + j], source.core[1 + 2 * t + j]
                for name, p in dst.named_parameters():
                    if not name.startswith(("attn.q.", "attn.v.")):
                        p.copy_(dict(src.named_parameters())[name])
    target = model(seed=5, n_prelude=1, n_core=2, n_coda=1, n_loops=3, lora_rank=32)
    init_from_source(target, source, "average")
    torch.testing.assert_close(target(IDX, loops=3)[0], source(IDX)[0], atol=1e-4, rtol=1e-4)
    low = model(seed=5, n_prelude=1, n_core=2, n_coda=1, n_loops=3, lora_rank=2)
    init_from_source(low, source, "average")
    assert not torch.allclose(low(IDX, loops=3)[0], source(IDX)[0], atol=1e-3)  # rank 2 cannot


def test_layer_similarity_is_each_layers_input_output_cosine():
    fresh = LoopGPT(LoopGPTConfig(vocab_size=61, block_size=16, n_embd=32, n_head=4, n_prelude=0, n_core=8,
                                  n_coda=0, n_loops=1))  # zero output projections: every block is the identity
    assert layer_similarity(fresh, IDX) == pytest.approx([1.0] * 8)
    source = model()
    sims = layer_similarity(source, IDX)
    x = norm(source.wte(IDX))
    y = source.core[0](x, (source.rope_cos[:16], source.rope_sin[:16]))
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    assert len(sims) == 8 and sims[0] == pytest.approx(cos.mean().item(), abs=1e-5) and max(sims) < 0.999


@pytest.mark.parametrize("source_kw, target_kw, message", [
    (dict(n_core=2, n_loops=4, injection="add"), dict(), "plain stack of layers"),
    (dict(), dict(n_prelude=1, n_core=4, n_coda=1, n_loops=2), "positive multiple of 4"),
    (dict(), dict(n_prelude=1, n_core=2, n_coda=1, n_loops=2, lora_rank=4), "lora_rank needs one loop per group"),
    (dict(), dict(n_prelude=1, n_core=2, n_coda=1, n_loops=3, mlp="swiglu"), "mlp='relu2' there, 'swiglu' here"),
])
def test_what_cannot_be_converted_says_why(source_kw, target_kw, message):
    with pytest.raises(ValueError, match=message):
        init_from_source(model(seed=5, **target_kw), model(**source_kw))
    with pytest.raises(ValueError, match="init_core"):
        init_from_source(model(), model(), "middle")


# ---- through train.py, as a user runs it ---------------------------------------------------------

from test_train import SMALL, records, run  # noqa: E402
from test_train import data_dir  # noqa: E402,F401  (the module-scoped prepared corpus)

PLAIN = [a for a in SMALL if not a.startswith(("--n_prelude", "--n_core", "--n_coda", "--n_loops"))]


def test_train_init_from_a_plain_checkpoint(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--eval_iters=2", "--eval_budgets=1"]
    run("train.py", *PLAIN, *common, "--n_prelude=0", "--n_core=8", "--n_coda=0", "--n_loops=1", "--injection=none",
        "--max_iters=6", "--eval_interval=6", f"--out_dir={tmp_path / 'base'}")
    source_val = records(tmp_path / "base", "eval")[-1]["val"]["1"]["loss"]
    # nothing shared (1 + 6 + 1, one loop): the converted model is the source, before any step
    p = run("train.py", *PLAIN, *common, f"--init_from={tmp_path / 'base'}", "--n_prelude=1", "--n_core=6",
            "--n_coda=1", "--max_iters=1", f"--out_dir={tmp_path / 'same'}")
    assert "1 + 6⊗1 + 1" in p.stdout and "step 0 (converted, before training)" in p.stdout
    step0 = records(tmp_path / "same", "eval")[0]
    assert step0["step"] == 0 and step0["val"]["1"]["loss"] == pytest.approx(source_val, abs=1e-5)
    # a loop: the 6 middle layers become a 2-block core looped 3 times (n_loops from the layers),
    # with a per-loop LoRA from the SVD; it trains on and resumes without converting again
    out = tmp_path / "up"
    p = run("train.py", *PLAIN, f"--data_dir={data_dir}", "--eval_iters=2", f"--init_from={tmp_path / 'base'}",
            "--n_prelude=1", "--n_core=2", "--n_coda=1", "--lora_rank=4", "--init_core=lower", "--max_iters=4",
            "--eval_interval=4", f"--out_dir={out}")
    assert "1 + 2⊗3 + 1" in p.stdout and "lora_q from SVD" in p.stdout
    evals = records(out, "eval")
    assert [e["step"] for e in evals] == [0, 4] and evals[0]["converted_from"] == str(tmp_path / "base")
    p = run("train.py", *PLAIN, f"--data_dir={data_dir}", "--eval_iters=2", f"--init_from={tmp_path / 'base'}",
            "--n_prelude=1", "--n_core=2", "--n_coda=1", "--n_loops=3", "--lora_rank=4", "--max_iters=6",
            "--eval_interval=6", "--resume=True", f"--out_dir={out}")
    assert "initialised from" not in p.stdout and records(out, "eval")[-1]["step"] == 6
