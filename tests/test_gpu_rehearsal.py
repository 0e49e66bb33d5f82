"""The GPU paths, rehearsed on a CPU: bf16 autocast through training, evaluation and the KV
cache; the compiled training step under DDP; the fused optimizer; the bf16 peak table; the
ReLU² backward; MFU's FLOP count; and tests/gpu_check.py itself, shortened."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import autocast_context, peak_bf16_flops  # noqa: E402
from loopgpt import LoopGPT, LoopGPTConfig, ReLUSquared, configure_optimizer, flops_per_token  # noqa: E402
from test_train import SMALL, records, run  # noqa: E402
from test_train import data_dir  # noqa: E402,F401  (the module-scoped prepared corpus)


def peaked_model(seed=0, **kw):
    """A small model trained for a few steps to repeat one sequence: its greedy choices have
    clear margins, so bf16 rounding cannot flip them (random logits are near-ties)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, block_size=48, n_embd=32, n_head=4, n_kv_head=2, n_loops=3, injection="add")
    model = LoopGPT(LoopGPTConfig(**{**cfg, **kw}))
    opt = configure_optimizer(model, 0.0, 1e-2, (0.9, 0.95))
    x = torch.randint(0, 64, (1, 48))
    x[:, 24:] = x[:, :24]
    for _ in range(60):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), x


def test_bf16_cache_takes_the_autocast_dtype_and_matches_the_full_forward():
    model, x = peaked_model()
    bf16, _ = autocast_context("cpu", "bfloat16")
    with torch.inference_mode(), bf16:
        full, _ = model(x[:, :40])
        cache = model.new_cache(3)
        prefix, _ = model(x[:, :20], cache=cache)
        steps = [model(x[:, t:t + 1], cache=cache)[0] for t in range(20, 40)]
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16  # half the memory of fp32
    cached = torch.cat([prefix] + steps, dim=1)
    assert full.dtype == torch.float32  # logits are always fp32
    # bf16 has 8 bits of mantissa: the two paths round differently, but not by much
    torch.testing.assert_close(cached, full, atol=0.1, rtol=0)
    with torch.inference_mode():  # without autocast the cache keeps the model's fp32
        cache = model.new_cache(3)
        model(x[:, :4], cache=cache)
    assert cache.k.dtype == torch.float32


def test_bf16_cached_generation_equals_uncached():
    model, x = peaked_model()
    bf16, _ = autocast_context("cpu", "bfloat16")
    with bf16:
        a = model.generate(x[:, :8], 30, temperature=0, use_cache=True)
        b = model.generate(x[:, :8], 30, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_autocast_context_and_dtype_errors():
    assert autocast_context("cpu")[1] == "float32" and autocast_context("cpu", "bfloat16")[1] == "bfloat16"
    with pytest.raises(SystemExit, match="gradient scaler"):
        autocast_context("cpu", "float16")
    with pytest.raises(SystemExit, match="valid: bfloat16, float32"):
        autocast_context("cpu", "bf16")


def test_bf16_training_tracks_fp32_and_sampling_runs(data_dir, tmp_path):  # noqa: F811
    common = [f"--data_dir={data_dir}", "--max_iters=6", "--eval_interval=6", *SMALL]
    for dtype in ("float32", "bfloat16"):
        p = run("train.py", f"--out_dir={tmp_path / dtype}", f"--dtype={dtype}", *common)
        assert f"cpu x1, {dtype}" in p.stdout
    a, b = records(tmp_path / "float32", "train"), records(tmp_path / "bfloat16", "train")
    for ra, rb in zip(a, b):  # the same init and batches: bf16 rounding moves the loss a little
        assert rb["loss"] == pytest.approx(ra["loss"], rel=0.01)
    assert records(tmp_path / "bfloat16", "config")[0]["dtype"] == "bfloat16"
    va, vb = records(tmp_path / "float32", "eval")[-1]["val"], records(tmp_path / "bfloat16", "eval")[-1]["val"]
    for M in va:
        assert vb[M]["loss"] == pytest.approx(va[M]["loss"], rel=0.01)
    p = run("sample.py", f"--out_dir={tmp_path / 'bfloat16'}", "--dtype=bfloat16", "--budgets=1,2",
            "--max_new_tokens=8", "--threads=2")
    assert "cpu, bfloat16, 2 threads" in p.stdout
    p = run("train.py", "--dtype=float16", *common, ok=False)
    assert "gradient scaler" in p.stderr


def test_compiled_training_under_torchrun_matches_eager(data_dir, tmp_path):  # noqa: F811
    # train.py --compile=True for real (inductor, as on a GPU): compiled blocks, then DDP
    # around the model, two processes (gloo) against one eager process on the same global batch
    common = [f"--data_dir={data_dir}", "--max_iters=3", "--eval_interval=3", "--grad_accum_steps=2", *SMALL]
    run("train.py", f"--out_dir={tmp_path / 'eager'}", *common)
    run("torchrun", cmd=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         "train.py", f"--out_dir={tmp_path / 'compiled'}", "--compile=True", *common])
    eager, compiled = records(tmp_path / "eager", "train"), records(tmp_path / "compiled", "train")
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert records(tmp_path / "compiled", "config")[0]["world"] == 2


def test_fused_adamw_only_on_a_gpu():
    # decided from where the parameters are: off a GPU no fused kernel is asked for, and the
    # optimizer builds (on the meta device too) and steps
    cfg = LoopGPTConfig(vocab_size=64, block_size=16, n_embd=32, n_head=2)
    for device in ("meta", "cpu"):
        with torch.device(device):
            model = LoopGPT(cfg)
        opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95))
        assert not any(g["fused"] for g in opt.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_peak_table_prefers_the_specific_name_and_knows_when_it_does_not_know():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12  # not the SXM part's peak
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert peak_bf16_flops("Some Future GPU") is None  # MFU is then reported as n/a, not guessed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_squared_backward_is_autograds_bit_for_bit(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 7, 64, dtype=dtype)
    x[0, 0, :4] = 0.0  # relu's kink: both give gradient 0 there
    g = torch.randn(4, 7, 64, dtype=dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ReLUSquared.apply(a), F.relu(b).square()
    assert torch.equal(ya, yb)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(a.grad, b.grad)


def test_flops_per_token_by_hand():
    cfg = LoopGPTConfig(vocab_size=100, block_size=8, n_embd=16, n_head=2, n_prelude=1, n_core=2, n_coda=1, n_loops=3)
    model = LoopGPT(cfg)
    per_block = 12 * 16 * 16  # q, k, v, proj (d x d each) + MLP (2 x 4d x d)
    forward = 2 * per_block + 4 * 16 * 8  # weights, then QK^T and AV over T = 8 keys
    head = 6 * 16 * 100
    assert flops_per_token(model, 3) == 3 * forward * (1 + 2 * 3 + 1) + head
    # truncated backprop: the first M - k loops run forward only (2 of the 6 FLOPs per weight)
    trunc = LoopGPT(LoopGPTConfig(**{**cfg.to_dict(), "bptt_k": 1}))
    assert flops_per_token(trunc, 3) == 3 * forward * 8 - 2 * forward * 2 * 2 + head
    assert flops_per_token(trunc, 1) == flops_per_token(model, 1)


def test_gpu_check_rehearsal(tmp_path):
    # the GPU check itself, on this CPU: flt_small's 6 blocks x 12 loops and GPT-2-sized vocab
    # at d=64 and a 32-token context, no compilation (test_compiled_training_under_torchrun_
    # matches_eager covers --compile=True; `--device=cpu` alone rehearses everything, slowly)
    out = tmp_path / "check"
    p = run("tests/gpu_check.py", f"--out_dir={out}", "--device=cpu", "--compile=False", "--steps=2",
            "--shrink=--n_embd=64 --n_head=1 --block_size=32")
    result = json.loads((out / "gpu_check.json").read_text())
    looped, plain = result["flt_small eager"], result["plain eager"]
    for r in (looped, plain):
        assert r["tokens_per_s"] > 0 and r["block_size"] == 32 and r["loss_last"] < 11, r
    assert looped["mean_loops"] == 12 and set(looped["val_loss"]) == {"1", "12"}
    assert plain["args"][-6:-1] == ["--n_core=72", "--n_prelude=0", "--n_coda=0", "--n_loops=1", "--injection=none"]
    assert plain["params_m"] > looped["params_m"]  # the same FLOPs as 6 x 12, unshared
    d = result["decode"]
    assert d["loops"] == 12 and d["fp32_first_difference"] is None and d["cache_dtype_bf16"] == "bfloat16"
    assert d["B1_cache_tok_s"] > 0 and d["B8_no_cache_tok_s"] > 0 and "B1_graph_tok_s" not in d  # no graphs on a CPU
    assert d["cache_logits_max_abs_diff_fp32"] < 1e-3
    assert result["bf16 vs fp32"]["ok"]
    b = result["step breakdown"]  # forward + backward and the optimizer timed apart, looped and plain
    assert (b["looped_muon_matrices"], b["plain_muon_matrices"]) == (36, 432) and b["plain_over_looped_fwd_bwd"] > 0
    assert result["eval speed"]["tok_s"] > 0 and result["eval speed"]["sequences"] == 8
    m = result["loss memory"]  # the chunked loss (4 chunks of the 32 tokens) against the whole logits, in bf16
    assert m["loss_chunk"] == 8 and m["loss_rel_diff"] < 1e-4 and m["grad_h_max_diff_rel"] < 1e-2
    k = result["kv sharing"]  # the shared cache: constant in M, a twelfth of the exact one's core at M = 12
    assert k["M12_last_cache_mib"] == k["M24_last_cache_mib"] < k["M12_none_cache_mib"] < k["M24_none_cache_mib"]
    assert k["M12_last_tok_s"] > 0
    assert "decode B=1, M=12, bf16: cache / no cache" in p.stdout and "Traceback" not in p.stderr
    p = run("tests/gpu_check.py", ok=False)
    assert "--out_dir=DIR" in p.stderr
    # --only: the named steps, and the flt_small run that decoding needs
    # --only: the named steps alone (here none that needs a training run); the peers' step needs their
    # checkouts: a folder without them is an error in the table, not a crash
    (tmp_path / "no-peers").mkdir()
    p = run("tests/gpu_check.py", f"--out_dir={out}", "--device=cpu", "--compile=False", "--only=loss memory,peers",
            f"--peers={tmp_path / 'no-peers'}", "--shrink=--n_embd=64 --n_head=1 --block_size=32")
    result = json.loads((out / "gpu_check.json").read_text())
    assert {"loss memory", "peers"} <= set(result) and not set(result) & {"flt_small eager", "plain eager", "decode"}
    assert result["loss memory"]["loss_rel_diff"] < 1e-4
    assert "holds neither FullyLoopedTransformer/ nor nanochat/" in result["peers"]["error"] and "MISSED" in p.stdout
