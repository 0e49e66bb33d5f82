"""
loopgpt's training step side by side with its peers' on the same device, in one process: the
FLT code (the FLT paper's nanochat fork) at flt_small's shape, and karpathy's nanochat at the
plain stack of the same FLOPs (6 x 12 = 72 blocks). Each model is built, compiled and trained
the way its own training script does it (loopgpt: train.py's Objective, compiled blocks, bf16
autocast, Muon + AdamW; FLT: the whole model compiled, autocast, its Muon and AdamW; nanochat:
the whole model compiled, its own bf16 casts, its MuonAdamW), on the same random tokens, one
micro-batch per step: forward, backward, gradient clipping where the script clips, optimizer
step. Prints tokens/s, ms per step and peak memory for each, and loopgpt / peer tokens/s.
Not a test file (pytest does not collect it): the peers' code is not part of the project.

    python tests/peer_step.py --flt=PATH/FullyLoopedTransformer --nanochat=PATH/nanochat
    python tests/peer_step.py --flt=... --nanochat=... --device=cpu --size=tiny   # a rehearsal

--flt is a checkout of github.com/FuRuF-11/FullyLoopedTransformer, --nanochat one of
github.com/karpathy/nanochat (either may be left out). Both name their package `nanochat`:
each is imported in turn and removed from sys.modules after. Their `filelock` import (for
downloads this script does not make) is stubbed when the package is missing.
"""

import contextlib
import json
import os
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from configs import (autocast_context, detect_device, fail, model_config_defaults, parse_args,  # noqa: E402
                     print_table, train_config_defaults)
from loopgpt import LoopGPT, LoopGPTConfig, compile_blocks, configure_optimizer, flops_per_token  # noqa: E402

args, _ = parse_args(sys.argv[1:], {
    "flt": "",          # a checkout of the FLT code (FuRuF-11/FullyLoopedTransformer)
    "nanochat": "",     # a checkout of karpathy/nanochat
    "device": "",       # "" = cuda if available
    "size": "small",    # small: flt_small's shape (6 x 12, d=384, 32 x 1024 tokens); tiny: a CPU rehearsal
    "steps": 10,        # timed steps per model, after 3 warm-up steps (compilation)
    "compile": True,
    "out": "",          # also write the results here as JSON
}, allow_config=False)
if args["size"] not in ("small", "tiny") or args["steps"] < 1:
    fail(f"--size={args['size']} --steps={args['steps']}: size is small or tiny, steps >= 1")
device = detect_device(args["device"])
gpu = device.startswith("cuda")
if args["size"] == "small":
    D, HEADS, LAYERS, LOOPS, B, T, V = 384, 3, 6, 12, 32, 1024, 50304
else:
    D, HEADS, LAYERS, LOOPS, B, T, V = 64, 2, 2, 3, 2, 64, 512


def sync():
    if gpu:
        torch.cuda.synchronize()


def time_steps(step):
    """(ms per step, peak GB): 3 warm-up steps, then args['steps'] timed ones."""
    for _ in range(3):
        step()
    sync()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args["steps"]):
        step()
    sync()
    ms = 1000 * (time.perf_counter() - t0) / args["steps"]
    return ms, (torch.cuda.max_memory_allocated() / 2**30 if gpu else None)


def tokens():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, V, (B, T), generator=g).to(device), torch.randint(0, V, (B, T), generator=g).to(device))


# ---- loopgpt, as train.py trains flt_small ------------------------------------------------------

def loopgpt_step(plain):
    from train import Objective
    flt, _ = parse_args(["--config=flt_small"], {**train_config_defaults(), **model_config_defaults()})
    keys = {k: flt[k] for k in model_config_defaults()}
    keys.update(n_embd=D, n_head=HEADS, n_core=LAYERS, n_loops=LOOPS, block_size=T, vocab_size=V)
    if plain:
        keys.update(n_core=LAYERS * LOOPS, n_loops=1, injection="none")
    torch.manual_seed(0)
    model = LoopGPT(LoopGPTConfig(**keys)).to(device)
    if args["compile"]:
        compile_blocks(model)
    opt = configure_optimizer(model, flt["weight_decay"], flt["learning_rate"], (flt["beta1"], flt["beta2"]),
                              flt["optimizer"], flt["muon_lr"], flt["embedding_lr"], flt["head_lr"], flt["adam_eps"])
    objective, (x, y) = Objective(model), tokens()
    autocast, _ = autocast_context(device)

    def step():
        with autocast:
            loss = objective(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), flt["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, flops_per_token(model, 1 if plain else LOOPS)


# ---- the peers ----------------------------------------------------------------------------------

@contextlib.contextmanager
def peer_package(path):
    """Import `path`'s `nanochat` package; forget it afterwards (both peers use the name)."""
    if not os.path.isdir(os.path.join(path, "nanochat")):
        fail(f"{path} has no nanochat/ package: give the repository's root")
    try:
        import filelock  # noqa: F401
    except ImportError:  # only their download helpers use it
        sys.modules["filelock"] = types.SimpleNamespace(FileLock=contextlib.nullcontext)
    sys.path.insert(0, path)
    try:
        yield
    finally:
        sys.path.remove(path)
        for name in [n for n in sys.modules if n == "nanochat" or n.startswith("nanochat.")]:
            del sys.modules[name]


def flt_step(path):
    """The FLT code's FLT model (the whole 6-block stack looped K = 12 times, queries from the
    previous loop), as its scripts/base_train.py builds and steps it."""
    with peer_package(path):
        from nanochat.gpt import GPT, GPTConfig
        with torch.device("meta"):
            model = GPT(GPTConfig(model_type="FLT", loss_type="END", K=LOOPS, sequence_len=T, vocab_size=V,
                                  n_layer=LAYERS, n_head=HEADS, n_kv_head=HEADS, n_embd=D))
        model.to_empty(device=device)
        model.init_weights()
        opts = model.setup_optimizers()
        flops = model.estimate_flops() if hasattr(model, "estimate_flops") else None
    run = torch.compile(model, dynamic=False) if args["compile"] else model
    (x, y), autocast = tokens(), torch.amp.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)

    def step():
        with autocast:
            loss = torch.stack(run(x, y)).mean()  # one loss per supervised loop; END: the last only
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
    return step, flops


def nanochat_step(path):
    """karpathy/nanochat's GPT at the plain stack's shape (72 blocks, all full attention), as
    its scripts/base_train.py builds and steps it (it casts to bf16 itself, no autocast)."""
    with peer_package(path):
        from nanochat.gpt import GPT, GPTConfig
        with torch.device("meta"):
            model = GPT(GPTConfig(sequence_len=T, vocab_size=V, n_layer=LAYERS * LOOPS, n_head=HEADS,
                                  n_kv_head=HEADS, n_embd=D, window_pattern="L"))
        model.to_empty(device=device)
        model.init_weights()
        opt = model.setup_optimizer()
        flops = model.estimate_flops() if hasattr(model, "estimate_flops") else None
    run = torch.compile(model, dynamic=False) if args["compile"] else model
    x, y = tokens()

    def step():
        run(x, y).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    return step, flops


# ---- side by side -------------------------------------------------------------------------------

results, rows = {}, []
pairs = [("loopgpt flt_small", lambda: loopgpt_step(False), "FLT code", args["flt"], flt_step),
         ("loopgpt plain 72x1", lambda: loopgpt_step(True), "nanochat plain 72x1", args["nanochat"], nanochat_step)]
for ours, build_ours, theirs, path, build_theirs in pairs:
    if not path:
        continue
    for name, build in ((ours, build_ours), (theirs, lambda: build_theirs(os.path.abspath(path)))):
        try:
            step, flops = build()
            ms, peak = time_steps(step)
            results[name] = {"ms": ms, "tokens_per_s": B * T / ms * 1000, "peak_gb": peak, "flops_per_token": flops}
        except Exception as e:  # a peer that does not run here is a result too
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        step = None
        if gpu:
            torch.cuda.empty_cache()
    if "tokens_per_s" in results[ours] and "tokens_per_s" in results[theirs]:
        results[f"{ours} / {theirs}"] = results[ours]["tokens_per_s"] / results[theirs]["tokens_per_s"]
for name, r in results.items():
    if isinstance(r, float):
        rows.append((name, f"{r:.2f}x tokens/s", "", ""))
    elif "error" in r:
        rows.append((name, r["error"], "", ""))
    else:
        rows.append((name, f"{r['tokens_per_s']:,.0f}", f"{r['ms']:.1f}", "-" if r["peak_gb"] is None else
                     f"{r['peak_gb']:.1f}"))
print(f"training step side by side on {torch.cuda.get_device_name() if gpu else device}, torch {torch.__version__}, "
      f"{B} x {T} tokens, compile={args['compile']}, {args['steps']} timed steps")
print(print_table(rows, ["model", "tokens/s", "ms/step", "peak GB"]))
if args["out"]:
    with open(args["out"], "w") as f:
        json.dump(results, f, indent=1)
