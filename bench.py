"""
Speed measurements, reported as ratios measured in one run (the machine is shared and
noisy, so absolute numbers drift; ratios taken side by side do not). Each line ends with a
verdict against its target.

    python bench.py                 # full
    python bench.py --quick=True    # under a minute on a 2-core CPU

Measured now:
- training-step cost of LoopFormer's shortcut-consistency and of the early-exit baselines'
  prefix route, relative to a plain 3⊗8 Base-Loop step (targets: <= 1.5x and <= 1.05x).
"""

import statistics
import sys
import time

import numpy as np
import torch

from common import detect_device, parse_args, print_table
from loopgpt import LoopGPT, LoopGPTConfig, sample_short_route

args, _ = parse_args(sys.argv[1:], {"quick": False, "device": "", "seed": 0}, allow_config=False)
device = detect_device(args["device"])
quick = args["quick"]
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)


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

    def step():
        with autocast:
            _, loss = model(x, y, short=short_fn() if short_fn else None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


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
        opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), device.split(":")[0])
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


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    print(f"bench.py on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
          f"{' (quick)' if quick else ''}")
    bench_short_routes()
