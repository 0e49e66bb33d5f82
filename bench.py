"""
Speed measurements, reported as ratios measured in one run (the machine is shared and
noisy, so absolute numbers drift; ratios taken side by side do not). Each line ends with a
verdict against its target.

    python bench.py                 # full
    python bench.py --quick=True    # under a minute on a 2-core CPU
    python bench.py --profile=True  # torch.profiler tables of a train step, a decode step and
                                    # a Muon optimizer step
    python bench.py --only=generation,relu2   # some sections: mfu, loop, muon, generation, relu2,
                                              # compile, routes, memory, loss, eval, kv, load

Measured:
- training throughput and MFU of a d=512 looped model: on CPU against the matmul throughput
  this same run measures (goal 40%), on GPU against the datasheet bf16 peak (goal 40%).
- looping costs nothing beyond its FLOPs: a 2⊗4 core vs an 8⊗1 stack of the same
  effective depth, step time deep / looped (target >= 0.95).
- Muon's optimizer step alone, the matrices of a shape orthogonalised as one batch against
  one matrix at a time, for an 8⊗1 stack and a 2⊗4 core at the same d: the stack has 4x
  the matrices (and Newton-Schulz FLOPs), and one at a time its step pays a launch per
  small op for each (the GPU check's 72⊗1 stack: 432 matrices).
- generation at the `tiny` size: tokens/s with the KV cache vs without at 256 new tokens
  (target >= 5x; block_size covers prompt + 256, so the cache is never rebuilt), at B=1
  and B=8, on 1 CPU thread (as sample.py decodes) and on all; seconds per token vs the
  budget M (should grow like the depth).
- the MLP with ReLU²'s hand-written backward against autograd's, and (full mode) a training
  step with compiled blocks against eager: what fusion buys.
- training-step cost of LoopFormer's shortcut-consistency and of the early-exit baselines'
  prefix route, relative to a plain 3⊗8 Base-Loop step (targets: <= 1.5x and <= 1.05x).
- evaluation at FLT's budgets 1, 3, 6, 9, 12: one pass to the largest budget that reads the
  others off its loop states, against one forward per budget (target >= 2x; ideal 31/12).
- peak training memory at L = 16 vs L = 4: plain backprop grows with L; truncated
  backprop (bptt_k = 4) and per-loop activation checkpointing should not (target <= 1.3x).
  On CPU each setting runs in a fresh process and the peak is the process's high-water
  RSS during one training step minus its RSS before it; on CUDA, max_memory_allocated.
- the training loss through the head in chunks of loss_chunk tokens (loopgpt.ChunkedHeadLoss)
  against the whole logits, for a model whose head dominates (GPT-2's vocabulary, one block at
  d=128): peak memory of one step's forward and backward, measured as above (target <= 0.25x
  at chunks of 1/8 of the tokens), and the step time the recomputed head matmul costs.
- K/V memory per cached position against the budget M for each kv_sharing (measured from the
  cache's buffers), and decoding speed with each: shared caches should stay constant in M.
- loading a released checkpoint (an Ouro-shaped model of random bfloat16 weights, 612M
  parameters; 126M in quick mode), every weight read once after: peak RSS above the process's
  before the load, against what it must hold. The file is memory-mapped and converted tensor
  by tensor, so a float32 load holds the float32 weights plus the file's pages it read, and a
  bfloat16 load only the mapped file (target <= 1.1x: nothing held twice).

The first line says the threads and the OpenMP wait policy it ran with (PASSIVE unless
OMP_WAIT_POLICY is set: see below).
"""

import json
import os
import statistics
import subprocess
import sys
import time

# OpenMP's threads may spin while they wait for work: next to another busy process that
# makes small-op timings swing (cached decoding at B=1 on 2 threads: 153 tokens/s passive,
# 47 spinning, with one core busy; README). Passive waiting costs little when the machine
# is idle and is stable when it is not. It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from configs import autocast_context, detect_device, fail, gpu_peak_flops, parse_args, print_table  # noqa: E402
from loopgpt import (LoopGPT, LoopGPTConfig, ReLUSquared, compile_blocks, configure_optimizer,  # noqa: E402
                     flops_per_token)
from sample import generate, new_cache  # noqa: E402
from train import Objective, sample_short_route  # noqa: E402

SECTIONS = ("mfu", "loop", "muon", "generation", "relu2", "compile", "routes", "memory", "loss", "eval", "kv", "load")
args, _ = parse_args(sys.argv[1:], {"quick": False, "device": "", "seed": 0, "memory_probe": "", "profile": False,
                                    "only": "", "load_probe": "", "loss_probe": ""}, allow_config=False)
only = [s for s in args["only"].split(",") if s] or list(SECTIONS)
if set(only) - set(SECTIONS):
    fail(f"--only={args['only']}: valid sections are {', '.join(SECTIONS)}")
if not 0 <= args["seed"] < 2**63:
    fail(f"--seed={args['seed']}: need 0 <= seed < 2^63")
device = detect_device(args["device"])
quick = args["quick"]
autocast, _ = autocast_context(device)  # bf16 on CUDA, fp32 on a CPU, as train.py runs


def time_steps(variants, rounds, warmup=2):
    """variants: {name: step function}. Runs them round-robin (so slow drift of the
    machine hits all alike) and returns the median seconds per step of each."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step_fn(model, opt, batch, short_fn=None):
    x, y = batch
    objective = Objective(model)  # train.py's loss around the model (the short routes live there)

    def step():
        with autocast:
            loss = objective(x, y, short=short_fn() if short_fn else None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def verdict(ok):
    return "ok" if ok else "OVER"


def matmul_peak():
    """FLOP/s this device reaches on a large matmul: the CPU's MFU denominator (measured,
    so that MFU says how much of the attainable throughput the model uses); on GPU the
    datasheet bf16 peak."""
    if device.startswith("cuda"):
        peak, name = gpu_peak_flops(device)
        return peak, f"datasheet bf16 peak of {name}" if peak else f"unknown peak for {name}"
    n = 1024 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    secs = time_steps({"mm": lambda: a @ b}, rounds=5 if quick else 10)["mm"]
    return 2 * n ** 3 / secs, f"measured fp32 {n}x{n} matmul, {torch.get_num_threads()} threads"


def bench_train_mfu():
    """Tokens/s and MFU of a training step, 1 + 2⊗4 + 1 at d=512 (the issue's size)."""
    d, T, B = (512, 128, 4) if quick else (512, 256, 8)
    torch.manual_seed(0)
    cfg = LoopGPTConfig(vocab_size=2048, block_size=T, n_embd=d, n_head=d // 64, n_prelude=1, n_core=2,
                        n_coda=1, n_loops=4, injection="add")
    model = LoopGPT(cfg).to(device)
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95))
    batch = tuple(torch.randint(0, 2048, (B, T), device=device) for _ in range(2))
    step = train_step_fn(model, opt, batch)
    secs = time_steps({"step": step}, rounds=3 if quick else 10)["step"]
    peak, what = matmul_peak()
    achieved = flops_per_token(model) * B * T / secs
    mfu = achieved / peak if peak else float("nan")
    print(f"\ntraining step, 1 + 2⊗4 + 1, d={d}, T={T}, B={B} on {device}: {B * T / secs:,.0f} tokens/s, "
          f"{achieved / 1e9:.1f} GFLOP/s")
    print(print_table([("MFU", f"{100 * mfu:.1f}%", f"{(peak or 0) / 1e9:,.1f} GFLOP/s ({what})", ">= 40%",
                        verdict(mfu >= 0.4))], ["what", "measured", "against", "target", "verdict"]))
    return mfu


def bench_loop_vs_deep():
    """A k⊗L core against a (kL)⊗1 stack: same FLOPs, so the same step time."""
    d, T, B = (128, 128, 8) if quick else (256, 256, 8)
    variants = {}
    for name, n_core, L in (("2⊗4 looped", 2, 4), ("8⊗1 deep", 8, 1)):
        torch.manual_seed(0)
        cfg = LoopGPTConfig(vocab_size=2048, block_size=T, n_embd=d, n_head=d // 64, n_prelude=0, n_core=n_core,
                            n_coda=0, n_loops=L)
        model = LoopGPT(cfg).to(device)
        opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95))
        batch = tuple(torch.randint(0, 2048, (B, T), device=device) for _ in range(2))
        variants[name] = train_step_fn(model, opt, batch)
    secs = time_steps(variants, rounds=8 if quick else 30)
    ratio = secs["8⊗1 deep"] / secs["2⊗4 looped"]
    print(f"\nlooped vs deep, effective depth 8, d={d}, T={T}, B={B} on {device}")
    print(print_table([(name, f"{1000 * s:.1f}") for name, s in secs.items()] +
                      [("deep / looped", f"{ratio:.3f}x  (target >= 0.95: {verdict(ratio >= 0.95)})")],
                      ["model", "ms/step"]))
    return ratio


def bench_muon():
    """Muon's optimizer step alone (fixed gradients), Newton-Schulz one matrix at a time
    (batched=False) against each shape's matrices as one batch (True), for an 8⊗1 stack and
    a 2⊗4 core at one d. (MuonAdamW's default batches on a GPU only.)"""
    d = 128 if quick else 256
    variants, matrices, ns_flops = {}, {}, {}
    for name, n_core, L in (("2⊗4 looped", 2, 4), ("8⊗1 plain", 8, 1)):
        torch.manual_seed(0)
        cfg = LoopGPTConfig(vocab_size=2048, block_size=64, n_embd=d, n_head=d // 64, n_prelude=0, n_core=n_core,
                            n_coda=0, n_loops=L)
        model = LoopGPT(cfg).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        for batched in (False, True):
            opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "muon")
            opt.batched = batched
            variants[name, batched] = opt.step
        shapes = [(g["ns_steps"], *sorted(p.shape)) for g in opt.param_groups if g["use_muon"] for p in g["params"]]
        matrices[name] = len(shapes)  # Newton-Schulz on s x l (s <= l): 3 matmuls a step, 4 s^2 l + 2 s^3 FLOPs
        ns_flops[name] = sum(steps * (4 * s * s * l + 2 * s ** 3) for steps, s, l in shapes)
    secs = time_steps(variants, rounds=5 if quick else 20)
    rows = [(name, matrices[name], f"{1000 * secs[name, False]:.1f}", f"{1000 * secs[name, True]:.1f}",
             f"{secs[name, False] / secs[name, True]:.2f}x") for name in matrices]
    plain, looped = "8⊗1 plain", "2⊗4 looped"
    rows.append(("plain / looped", f"{matrices[plain] / matrices[looped]:.0f}x",
                 *(f"{secs[plain, b] / secs[looped, b]:.2f}x" for b in (False, True)),
                 f"(Newton-Schulz FLOPs {ns_flops[plain] / ns_flops[looped]:.0f}x)"))
    speedup = secs[plain, False] / secs[plain, True]
    print(f"\nMuon optimizer step alone, d={d} on {device}: Newton-Schulz one matrix at a time vs batched by shape")
    print(print_table(rows, ["model", "Muon matrices", "one at a time ms", "batched ms", "speedup"]))
    if device.startswith("cuda"):  # one at a time, each small matrix costs ~40 kernel launches
        print(f"plain stack, batched vs one at a time: {speedup:.2f}x (target >= 2x: {verdict(speedup >= 2)})")
    else:  # a CPU is not launch-bound, and its batched matmul is slower than single ones
        print("(on a CPU MuonAdamW orthogonalises one matrix at a time: batched=None)")
    return speedup


def bench_generation():
    """Decoding at the `tiny` size (1 + 2⊗4 + 1, d=128): KV cache vs none at B=1 and B=8, on
    one CPU thread (sample.py's default) and on all of them; then the cost vs M."""
    n_new = 64 if quick else 256
    torch.manual_seed(0)
    cfg = LoopGPTConfig(vocab_size=2048, block_size=n_new + 16, n_embd=128, n_head=4, n_prelude=1, n_core=2,
                        n_coda=1, n_loops=4, injection="add")
    model = LoopGPT(cfg).to(device).eval()
    prompts = {B: torch.randint(0, 2048, (B, 16), device=device) for B in (1, 8)}
    all_threads = torch.get_num_threads()
    thread_counts = (1, all_threads) if all_threads > 1 and not device.startswith("cuda") else (all_threads,)

    def gen(M, use_cache, B=1, threads=1):
        def fn():
            torch.set_num_threads(threads)
            model.generate(prompts[B], n_new, loops=M, temperature=0, use_cache=use_cache)
        return fn
    rows, speedup = [], None
    for B in (1, 8):
        secs = time_steps({(n, c): gen(4, c, B, n) for n in thread_counts for c in (True, False)},
                          rounds=2 if quick else 3, warmup=1)
        for n in thread_counts:
            ratio = secs[n, False] / secs[n, True]
            target = B == 1 and n == thread_counts[0]  # the target is for one stream, as sample.py decodes
            speedup = ratio if target else speedup
            rows.append((B, n, f"{B * n_new / secs[n, True]:,.0f}", f"{B * n_new / secs[n, False]:,.0f}",
                         f"{ratio:.1f}x", f"{verdict(ratio >= 5)} (target >= 5x)" if target else "-"))
    print(f"\ngeneration, tiny size (1 + 2⊗4 + 1, d=128), {n_new} new tokens after 16, greedy, M=4, on {device}")
    print(print_table(rows, ["B", "threads", "KV cache tok/s", "no cache tok/s", "speedup", "verdict"]))
    budgets = (1, 2, 4, 8)
    by_M = time_steps({M: gen(M, True, 1, thread_counts[0]) for M in budgets}, rounds=2 if quick else 3, warmup=1)
    torch.set_num_threads(all_threads)
    rows = []
    for M in budgets:
        # cost per token should grow like the effective depth (prelude + 2M + coda blocks)
        rel, ideal = by_M[M] / by_M[1], model.effective_depth(M) / model.effective_depth(1)
        rows.append((M, model.effective_depth(M), f"{n_new / by_M[M]:,.0f}", f"{rel:.2f}x", f"{ideal:.2f}x",
                     f"{rel / ideal:.2f}", verdict(0.8 <= rel / ideal <= 1.2)))
    print(print_table(rows, ["M", "depth", "tokens/s (B=1)", "s/token vs M=1", "depth vs M=1",
                             "ratio (target 0.8..1.2)", "verdict"]))
    return speedup


def bench_kv_sharing():
    """K/V bytes per cached position against the budget M for each kv_sharing, measured from the
    cache's buffers after a prompt and 32 decoded tokens (on CUDA also as allocator memory),
    and decoding tokens/s at M = 8: sharing should hold memory constant in M at the same speed."""
    torch.manual_seed(0)
    cfg = LoopGPTConfig(vocab_size=2048, block_size=64, n_embd=128, n_head=4, n_prelude=1, n_core=2,
                        n_coda=1, n_loops=4, injection="add")
    model = LoopGPT(cfg).to(device).eval()
    prompt = torch.randint(0, 2048, (1, 16), device=device)
    budgets, kinds = (1, 2, 4, 8, 16), ("none", "last", "mean", "first", "window:2")
    rows, constant = [], True
    for kind in kinds:
        per_pos = []
        for M in budgets:
            cache = new_cache(model, M, kind)
            with torch.inference_mode():
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                    before = torch.cuda.memory_allocated()
                model(prompt, loops=M, cache=cache)
                for _ in range(32):
                    model(prompt[:, -1:], loops=M, cache=cache)
                allocated = torch.cuda.memory_allocated() - before if device.startswith("cuda") else None
            per_pos.append(cache.nbytes() / cfg.block_size)
            if allocated is not None and allocated < cache.nbytes():
                print(f"note: {kind} M={M}: the allocator holds {allocated:,} bytes, the cache {cache.nbytes():,}")
        if kind in ("last", "mean", "first"):
            constant = constant and per_pos[-1] == per_pos[0]
        rows.append((kind, *[f"{b / 1024:.1f}" for b in per_pos], f"{per_pos[-1] / per_pos[0]:.1f}x"))
    print(f"\nKV cache, tiny size (1 + 2⊗M + 1, d=128, fp32): KiB per cached position (all slots), on {device}")
    print(print_table(rows, ["kv_sharing", *[f"M={M}" for M in budgets], "M=16 / M=1"]))
    secs = time_steps({k: (lambda k=k: generate(model, prompt, 32, loops=8, temperature=0, kv_sharing=k))
                       for k in kinds}, rounds=2 if quick else 3, warmup=1)
    print(print_table([(k, f"{32 / secs[k]:,.1f}", f"{secs['none'] / secs[k]:.2f}x") for k in kinds],
                      ["kv_sharing", "tok/s at M=8 (B=1)", "speed vs none"]))
    print(f"memory constant in M for last / mean / first: {verdict(constant)}")
    return constant


def bench_compile():
    """What torch.compile's fusion buys: one training step eager and with compiled blocks."""
    d, T, B = (128, 128, 8) if quick else (256, 256, 8)
    batch = tuple(torch.randint(0, 2048, (B, T), device=device) for _ in range(2))
    variants, t0 = {}, time.time()
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        cfg = LoopGPTConfig(vocab_size=2048, block_size=T, n_embd=d, n_head=d // 64, n_prelude=1, n_core=2,
                            n_coda=1, n_loops=4, injection="add")
        model = LoopGPT(cfg).to(device)
        if name == "compiled":
            compile_blocks(model)
        variants[name] = train_step_fn(model, configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95)), batch)
    variants["compiled"]()  # the compilation itself, timed apart
    compile_s = time.time() - t0
    secs = time_steps(variants, rounds=5 if quick else 20)
    ratio = secs["eager"] / secs["compiled"]
    print(f"\ntorch.compile of the blocks, training step, 1 + 2⊗4 + 1, d={d}, T={T}, B={B} on {device} "
          f"(compiling took {compile_s:.0f} s)")
    print(print_table([(name, f"{1000 * s:.1f}") for name, s in secs.items()] +
                      [("eager / compiled", f"{ratio:.3f}x")], ["mode", "ms/step"]))


def bench_relu2():
    """The MLP (d=512) with ReLU²'s hand-written backward against autograd's relu(x).square()."""
    d, (B, T) = 512, ((4, 128) if quick else (8, 256))
    torch.manual_seed(0)
    fc, proj = nn.Linear(d, 4 * d, bias=False).to(device), nn.Linear(4 * d, d, bias=False).to(device)
    x = torch.randn(B, T, d, device=device, requires_grad=True)
    g = torch.randn(B, T, d, device=device)

    def mlp(act):
        return lambda: proj(act(fc(x))).backward(g)
    secs = time_steps({"autograd relu(x).square()": mlp(lambda h: F.relu(h).square()),
                       "ReLUSquared (loopgpt)": mlp(ReLUSquared.apply)}, rounds=5 if quick else 20)
    base = secs["autograd relu(x).square()"]
    print(f"\nMLP forward + backward, d={d}, ({B}, {T}, {4 * d}) hidden, on {device}")
    print(print_table([(name, f"{1000 * s:.1f}", f"{base / s:.2f}x") for name, s in secs.items()],
                      ["ReLU²", "ms", "speed vs autograd"]))


def bench_short_routes():
    """LoopFormer (shortcut route, a second forward) and EE (prefix route) vs a plain step."""
    d, T, B = (128, 128, 8) if quick else (256, 256, 8)
    L = 8
    rng = np.random.default_rng(args["seed"])
    batch = tuple(torch.randint(0, 2048, (B, T), device=device) for _ in range(2))
    variants = {}
    for name, modulation, short_fn in (
        ("Base-Loop 3⊗8 (final loss only)", "none", None),
        ("Base-Loop-EE-Cons (prefix route)", "none", lambda: int(rng.integers(1, L))),
        ("TMLT-EE (prefix route)", "tmlt", lambda: int(rng.integers(1, L))),
        ("LoopFormer (shortcut route)", "loopformer", lambda: sample_short_route(L, rng)),
    ):
        torch.manual_seed(0)
        cfg = LoopGPTConfig(vocab_size=2048, block_size=T, n_embd=d, n_head=d // 64, n_prelude=0, n_core=3,
                            n_coda=0, n_loops=L, modulation=modulation, mlp="gelu", tie_embeddings=True)
        model = LoopGPT(cfg).to(device)
        opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95))
        variants[name] = train_step_fn(model, opt, batch, short_fn)
    secs = time_steps(variants, rounds=8 if quick else 30)
    base = secs["Base-Loop 3⊗8 (final loss only)"]
    targets = {"Base-Loop-EE-Cons (prefix route)": 1.05, "TMLT-EE (prefix route)": 1.05,
               "LoopFormer (shortcut route)": 1.5}
    rows = []
    for name, s in secs.items():
        ratio = s / base
        target = targets.get(name)
        verdict = "-" if target is None else ("ok" if ratio <= target else "OVER")
        rows.append((name, f"{1000 * s:.1f}", f"{ratio:.3f}x", f"<= {target}x" if target else "baseline", verdict))
    print(f"\ntraining step, 3⊗8, d={d}, T={T}, B={B} on {device} (median of interleaved steps)")
    print(print_table(rows, ["variant", "ms/step", "vs Base-Loop", "target", "verdict"]))


@torch.no_grad()
def bench_eval_budgets():
    """eval.py at FLT's budgets 1, 3, 6, 9, 12: one pass to M = 12 that reads every smaller
    budget off its loop state (logits_at_budgets) against one forward per budget."""
    d, T, B = (128, 128, 8) if quick else (256, 256, 8)
    torch.manual_seed(0)
    cfg = LoopGPTConfig(vocab_size=2048, block_size=T, n_embd=d, n_head=d // 64, n_prelude=0, n_core=2, n_coda=0,
                        n_loops=12, injection="full_attn")
    model = LoopGPT(cfg).to(device).eval()
    idx = torch.randint(0, 2048, (B, T), device=device)
    budgets = (1, 3, 6, 9, 12)

    def run(shared):
        def fn():
            with autocast:
                if shared:
                    for _ in model.logits_at_budgets(idx, budgets):
                        pass
                else:
                    for M in budgets:
                        model(idx, loops=M)
        return fn
    secs = time_steps({"shared": run(True), "per budget": run(False)}, rounds=5 if quick else 20)
    ratio = secs["per budget"] / secs["shared"]
    print(f"\neval at budgets {','.join(map(str, budgets))}, FLT 2⊗12, d={d}, T={T}, B={B} on {device}: one pass "
          f"{1000 * secs['shared']:.1f} ms, one forward per budget {1000 * secs['per budget']:.1f} ms: "
          f"{ratio:.2f}x faster (target >= 2x; loops 31 / 12 = 2.58x) {verdict(ratio >= 2)}")


def rss_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def memory_probe(spec):
    """One training step of the model `spec` = 'L,bptt_k,checkpoint'; prints its peak memory in MB."""
    try:  # an internal key: bench.py's memory section runs itself with it, one process per model
        L, k, ckpt = (int(v) for v in spec.split(","))
    except ValueError:
        fail(f"--memory_probe={spec}: an internal key, 'n_loops,bptt_k,checkpoint' (three integers)")
    if L < 1 or k < 0:
        fail(f"--memory_probe={spec}: need n_loops >= 1 and bptt_k >= 0")
    d, T, B = (128, 256, 8) if quick else (256, 512, 8)
    torch.manual_seed(0)
    cfg = LoopGPTConfig(vocab_size=2048, block_size=T, n_embd=d, n_head=d // 64, n_prelude=1, n_core=2, n_coda=1,
                        n_loops=L, injection="add", bptt_k=k, checkpoint_loops=bool(ckpt))
    model = LoopGPT(cfg).to(device)
    x, y = (torch.randint(0, 2048, (B, T), device=device) for _ in range(2))
    model(x[:1, :8], y[:1, :8])[1].backward()  # allocate the gradients before measuring
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_kb("VmRSS") * 1024
    model(x, y)[1].backward()
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else rss_kb("VmHWM") * 1024
    print(json.dumps({"mb": (peak - base) / 2 ** 20}))


def bench_loop_memory():
    rows, mb = [], {}
    for name, k, ckpt in (("full backprop", 0, 0), ("bptt_k=4", 4, 0), ("checkpoint_loops", 0, 1)):
        for L in (4, 16):
            # big CPU allocations straight from mmap, so that freed activations go back to the
            # OS: otherwise glibc keeps them in its heap and the high-water RSS measures the
            # allocator's fragmentation rather than what the model holds
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            out = subprocess.run([sys.executable, __file__, f"--memory_probe={L},{k},{ckpt}", f"--quick={quick}",
                                  f"--device={device}"], capture_output=True, text=True, check=True, env=env).stdout
            mb[name, L] = json.loads(out.strip().splitlines()[-1])["mb"]
        ratio = mb[name, 16] / mb[name, 4]
        target = None if name == "full backprop" else 1.3
        verdict = "grows, as expected" if target is None else ("ok" if ratio <= target else "OVER")
        rows.append((name, f"{mb[name, 4]:.0f}", f"{mb[name, 16]:.0f}", f"{ratio:.2f}x",
                     f"<= {target}x" if target else "-", verdict))
    d, T = (128, 256) if quick else (256, 512)
    print(f"\npeak training memory, 1 + 2⊗L + 1, d={d}, T={T}, B=8 on {device} (MB above the model)")
    print(print_table(rows, ["setting", "L=4", "L=16", "L16 / L4", "target", "verdict"]))


def head_heavy_step(loss_chunk):
    """A model whose training step is mostly its head: one block at d=128 with GPT-2's
    vocabulary (50,304), 8 x 512 tokens (quick: 4 x 512). Returns (step function: forward and
    backward of train.py's loss with this loss_chunk, the tokens, the model)."""
    B, T = (4, 512) if quick else (8, 512)
    torch.manual_seed(0)
    cfg = LoopGPTConfig(vocab_size=50304, block_size=T, n_embd=128, n_head=2, n_prelude=0, n_core=1, n_coda=0,
                        n_loops=1)
    model = LoopGPT(cfg).to(device)
    objective = Objective(model, loss_chunk=loss_chunk)
    x, y = (torch.randint(0, cfg.vocab_size, (B, T), device=device) for _ in range(2))

    def step(n=B):
        with autocast:
            loss = objective(x[:n], y[:n])
        loss.backward()
    return step, B * T, model


def loss_probe(spec):
    """One step of head_heavy_step(loss_chunk = spec); prints its peak memory above the model and its gradients, in MB."""
    if not spec.isdigit():  # an internal key: bench.py's loss section runs itself with it, one process per setting
        fail(f"--loss_probe={spec}: an internal key, loss_chunk (an integer >= 0)")
    step, _, _ = head_heavy_step(int(spec))
    step(1)  # allocate the gradients before measuring (one row: at most loss_chunk tokens, the whole-logits path)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_kb("VmRSS") * 1024
    step()
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else rss_kb("VmHWM") * 1024
    print(json.dumps({"mb": (peak - base) / 2 ** 20}))


def bench_loss_memory():
    """The whole logits (loss_chunk=0) against chunks of 1/2 and 1/8 of the tokens: peak memory
    (a fresh process each, loss_probe) and step time (interleaved, in this process)."""
    _, N, model = head_heavy_step(0)
    chunks = (0, N // 2, N // 8)
    mb = {}
    for rows in chunks:  # (the same allocator setting as the memory section, for the same reason)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        out = subprocess.run([sys.executable, __file__, f"--loss_probe={rows}", f"--quick={quick}", f"--device={device}"],
                             capture_output=True, text=True, check=True, env=env).stdout
        mb[rows] = json.loads(out.strip().splitlines()[-1])["mb"]
    secs = time_steps({rows: head_heavy_step(rows)[0] for rows in chunks}, rounds=3 if quick else 5, warmup=1)
    logits_mb = N * model.config.vocab_size * 4 / 2 ** 20
    rows = [("0 (whole logits)", f"{mb[0]:,.0f}", "1.00x", f"{1000 * secs[0]:,.0f}", "1.00x", "-", "-")]
    for r in chunks[1:]:
        target = r == N // 8
        rows.append((f"{r} (1/{N // r} of the tokens)", f"{mb[r]:,.0f}", f"{mb[r] / mb[0]:.2f}x", f"{1000 * secs[r]:,.0f}",
                     f"{secs[r] / secs[0]:.2f}x", "<= 0.25x" if target else "-",
                     verdict(mb[r] / mb[0] <= 0.25) if target else "-"))
    print(f"\ntraining loss in chunks (loss_chunk), 1 block at d=128, vocab 50,304, {N:,} tokens on {device}: peak "
          f"memory of a step's forward + backward above the model (the fp32 logits alone: {logits_mb:,.0f} MB)")
    print(print_table(rows, ["loss_chunk", "peak MB", "vs whole", "ms/step", "vs whole", "target", "verdict"]))


def load_probe(spec):
    """Load the checkpoint folder in `spec` = 'FOLDER,DTYPE' as sample.py does; prints the peak
    RSS above the RSS before the load, and the parameters' bytes, in MB."""
    import data.huggingface as hf  # an internal key: the load section runs itself with it, one process per dtype
    folder, _, dtype = spec.rpartition(",")
    if not os.path.isdir(folder) or dtype not in ("float32", "bfloat16", "float16"):
        fail(f"--load_probe={spec}: an internal key, 'FOLDER,DTYPE' (a checkpoint folder; float32, bfloat16 or float16)")
    for dt in (torch.float32, torch.bfloat16):  # torch's own first-use allocations (about 70 MB, building a
        torch.ones(64, 64, dtype=dt).sum().item()  # first model included) go before the baseline
    with torch.device("meta"):
        LoopGPT(LoopGPTConfig())
    base = rss_kb("VmRSS") * 1024
    t0 = time.time()
    model, _, _ = hf.model_from_hf(folder, dtype=getattr(torch, dtype))
    for p in model.parameters():  # read every page of every weight, as a forward would: mapped pages count once read
        p.detach().reshape(-1)[::4096 // p.element_size()].sum().item()
    seconds = time.time() - t0
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak": (rss_kb("VmHWM") * 1024 - base) / 2 ** 20, "params": params / 2 ** 20, "s": seconds}))


def bench_load():
    import tempfile
    import data.huggingface as hf
    layers, d = (2, 1024) if quick else (8, 2048)  # Ouro-1.4B's width and vocabulary; 8 of its 24 layers
    ouro = {"model_type": "ouro", "vocab_size": 49152, "hidden_size": d, "intermediate_size": d * 11 // 4,
            "num_hidden_layers": layers, "num_attention_heads": d // 128, "num_key_value_heads": d // 128,
            "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 4096,
            "tie_word_embeddings": False, "hidden_act": "silu", "total_ut_steps": 4}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LoopGPT(LoopGPTConfig(**hf.ouro_keys(ouro))).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        weights = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
        hf.write_safetensors(os.path.join(folder, "model.safetensors"), weights)
        del weights
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"model_type": "loopgpt", "loopgpt": LoopGPTConfig(**hf.ouro_keys(ouro)).to_dict()}, f)
        n = sum(s.numel() for s in shapes.values())
        rows, file_mb = [], os.path.getsize(os.path.join(folder, "model.safetensors")) / 2 ** 20
        for dtype in ("float32", "bfloat16"):
            out = subprocess.run([sys.executable, __file__, f"--load_probe={folder},{dtype}"], capture_output=True,
                                 text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            # float32: the converted weights plus the file's pages read to make them (the kernel may
            # reclaim those); bfloat16: the weights are the mapped file's pages, nothing else
            held = r["params"] + (file_mb if dtype != "bfloat16" else 0)
            rows.append((dtype, f"{r['params']:.0f}", f"{held:.0f}", f"{r['peak']:.0f}", f"{r['peak'] / held:.2f}x",
                         f"{r['s']:.1f}", verdict(r["peak"] / held <= 1.1)))
    print(f"\nloading a released checkpoint (Ouro-shaped, {layers} layers, d={d}, {n / 1e6:.0f}M parameters, "
          f"a {file_mb:.0f} MB bfloat16 file) on cpu: peak RSS above the process's before the load, against the "
          f"weights it must hold (target <= 1.1x: nothing held twice)")
    print(print_table(rows, ["loaded as", "params MB", "must hold MB", "peak MB", "peak / held", "seconds", "verdict"]))


def profile():
    """Where the time of a training step (tiny size), a decoding step and Muon's step goes."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    torch.manual_seed(0)
    cfg = LoopGPTConfig(vocab_size=2048, block_size=128, n_embd=128, n_head=4, n_prelude=1, n_core=2, n_coda=1,
                        n_loops=4, injection="add")
    model = LoopGPT(cfg).to(device)
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95))
    step = train_step_fn(model, opt, tuple(torch.randint(0, 2048, (8, 128), device=device) for _ in range(2)))
    prompt = torch.randint(0, 2048, (1, 16), device=device)
    # Muon's step alone on an 8-block plain stack (48 matrices, 3 shapes) at the same size
    plain = LoopGPT(LoopGPTConfig(**{**cfg.to_dict(), "n_prelude": 0, "n_core": 8, "n_coda": 0, "n_loops": 1}))
    plain.to(device)
    for p in plain.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    muon = configure_optimizer(plain, 0.1, 1e-3, (0.9, 0.95), "muon")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    for name, fn in (("training step, B=8, T=128", step),
                     ("decoding 64 tokens with the KV cache",
                      lambda: model.eval().generate(prompt, 64, temperature=0)),
                     ("Muon optimizer step, plain 8⊗1 stack", muon.step)):
        fn()
        with torch_profile(activities=activities) as prof:
            fn()
        model.train()
        print(f"\n{name} ({device}):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__" and args["memory_probe"]:
    memory_probe(args["memory_probe"])
elif __name__ == "__main__" and args["loss_probe"]:
    loss_probe(args["loss_probe"])
elif __name__ == "__main__" and args["load_probe"]:
    load_probe(args["load_probe"])
elif __name__ == "__main__" and args["profile"]:
    profile()
elif __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    print(f"bench.py on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}{' (quick)' if quick else ''}")
    for name, bench in (("mfu", bench_train_mfu), ("loop", bench_loop_vs_deep), ("muon", bench_muon),
                        ("generation", bench_generation),
                        ("relu2", bench_relu2), ("compile", bench_compile), ("routes", bench_short_routes),
                        ("memory", bench_loop_memory), ("loss", bench_loss_memory), ("eval", bench_eval_budgets),
                        ("kv", bench_kv_sharing), ("load", bench_load)):
        if name in only and not (name == "compile" and quick and not args["only"]):  # compiling takes a CPU minute
            bench()
