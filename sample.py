"""
Generate text from a trained LoopGPT at several loop budgets, side by side.

    python sample.py                              # the model in out/, at its train budget
    python sample.py --budgets=1,2,4,8            # same prompt and seed at four budgets
    python sample.py --start="def " --max_new_tokens=100 --temperature=0.7
    python sample.py --start=FILE:prompt.txt --num_samples=3
    python sample.py --schedule=3,2,2,1           # LoopFormer: 4 steps of 3/8, 2/8, 2/8, 1/8
    python sample.py --budgets=2,8 --schedule=3,2,2,1/0.5,0.5   # several, side by side
    python sample.py --budgets=16 --exit=kl:1e-3  # per-token early exit (also latent:0.03, gate:0.9)
    python sample.py --budgets=4,16 --kv_sharing=last   # K/V memory constant in the budget (also mean, first, window:N)

Every budget restarts the random generator from the same seed, so the differences
between budgets come from the loops alone.
"""

import os
import sys
import time

import torch

from configs import autocast_context, detect_device, fail, parse_args, print_table
from loopgpt import check_fits, load_checkpoint, model_from_checkpoint, parse_exit, parse_kv_sharing, parse_schedule
from data.tokenizer import load_tokenizer

defaults = dict(
    out_dir="out",
    start="\n",              # prompt text, or FILE:path to read it from a file
    budgets=(),              # loop budgets M to compare; () = the train budget
    schedule="",             # LoopFormer schedules: step sizes in units of 1/L (or fractions),
                             # several separated by "/"
    num_samples=1,
    max_new_tokens=200,
    temperature=0.8,         # 0 = greedy
    top_k=200,               # 0 = no top-k
    seed=1337,
    device="",
    dtype="",                # bfloat16 (autocast) | float32; "" = bfloat16 on CUDA, float32 on CPU
    threads=1,               # CPU threads; 0 = torch's default. One decodes fastest here (README)
    use_cache=True,
    exit="",                 # per-token early exit, kind:threshold: kl:1e-3, latent:0.03, gate:0.9, gate_all:0.9
    min_loops=1,             # with exit: no token stops before this many loops
    kv_sharing="none",       # K/V shared across loops: none (exact) | last | mean | first | window:N
)
args, _ = parse_args(sys.argv[1:], defaults, allow_config=False)
for key, ok, need in (("num_samples", args["num_samples"] >= 1, ">= 1"),
                      ("max_new_tokens", args["max_new_tokens"] >= 1, ">= 1"),
                      ("temperature", 0 <= args["temperature"] < float("inf"), "finite and >= 0 (0 = greedy)"),
                      ("threads", 0 <= args["threads"] <= os.cpu_count(),
                       f"between 0 (torch's default) and this machine's {os.cpu_count()} cores"),
                      ("top_k", args["top_k"] >= 0, ">= 0 (0 = off)"), ("seed", 0 <= args["seed"] < 2**63, "in [0, 2^63)"),
                      ("min_loops", args["min_loops"] >= 1, ">= 1")):
    if not ok:
        fail(f"--{key}={args[key]}: need {key} {need}")
try:
    parse_kv_sharing(args["kv_sharing"])
except ValueError as e:
    fail(f"--kv_sharing={args['kv_sharing']}: {e}")
if args["kv_sharing"] != "none" and (args["exit"] or not args["use_cache"]):
    fail(f"--kv_sharing={args['kv_sharing']} shares the KV cache: it needs --use_cache=True and no --exit")
if args["min_loops"] > 1 and not args["exit"]:
    fail("--min_loops holds back an early exit: it needs --exit (e.g. --exit=kl:1e-3)")
if args["threads"]:
    # a decoding step at B=1 is ~2,000 small ops; on a CPU each parallel op pays a thread
    # hand-off that outweighs its work, and a busy neighbour core stalls it far more
    torch.set_num_threads(args["threads"])

try:
    ckpt = load_checkpoint(f"{args['out_dir']}/ckpt.pt")
    model = model_from_checkpoint(ckpt)
except ValueError as e:
    fail(str(e))
try:
    enc = load_tokenizer(ckpt["data_meta"]["tokenizer"])
except RuntimeError as e:  # GPT-2's BPE files need a network the first time
    fail(str(e))
cfg = model.config
budgets = args["budgets"] or (() if args["schedule"] else (cfg.n_loops,))
for M in budgets:  # the model's own check: M >= 1, and M <= n_loops for MoR
    try:
        model.steps(M)
    except ValueError as e:
        fail(f"--budgets={','.join(map(str, budgets))}: {e}")

exit = None
if args["exit"]:
    try:
        exit = parse_exit(args["exit"], cfg)
    except ValueError as e:
        fail(f"--exit={args['exit']}: {e}")

# what to compare: budgets M (uniform steps), then schedules
routes = [(f"M={M}", {"loops": M}, M) for M in budgets]
for text in filter(None, args["schedule"].split("/")):
    try:
        steps = parse_schedule(text, cfg)
    except ValueError as e:
        fail(f"--schedule={text}: {e}")
    routes.append((f"schedule {text}", {"schedule": steps}, len(steps)))
device = detect_device(args["device"])
autocast, dtype = autocast_context(device, args["dtype"])
model.to(device).eval()

start = args["start"]
if start.startswith("FILE:"):
    try:
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read prompt file {start[5:]} as UTF-8 text: {e}")
start_ids = enc.encode(start, allowed_special="all") if start else [enc.eot_token]
if len(start_ids) > cfg.block_size:
    print(f"note: the prompt has {len(start_ids)} tokens; keeping the last block_size={cfg.block_size}")
    start_ids = start_ids[-cfg.block_size:]
x = torch.tensor([start_ids], dtype=torch.long, device=device)
if args["use_cache"]:  # refuse a budget whose KV cache cannot fit before allocating it
    for name, route, M in routes:
        try:
            cache_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
            check_fits(model.kv_cache_bytes(1, M, cache_dtype, args["kv_sharing"]), f"{name}: the KV cache "
                       f"({args['kv_sharing']} sharing, {cfg.block_size} positions)", device)
        except ValueError as e:
            fail(f"{e}; choose a smaller budget")

print(f"{args['out_dir']}/ckpt.pt: {model.summary()}, trained {ckpt['iter_num']} steps | {device}, {dtype}, "
      f"{torch.get_num_threads()} threads")
rows = []
for name, route, M in routes:
    torch.manual_seed(args["seed"])
    t0 = time.time()
    texts, used = [], []
    for _ in range(args["num_samples"]):
        with autocast:
            y = model.generate(x, args["max_new_tokens"], temperature=args["temperature"],
                               top_k=args["top_k"] or None, use_cache=args["use_cache"], exit=exit,
                               min_loops=args["min_loops"], loops_used=used, kv_sharing=args["kv_sharing"], **route)
        new = [t for t in y[0, len(start_ids):].tolist() if t < enc.n_vocab]  # drop padded-vocab ids
        texts.append(enc.decode(new))
    dt = time.time() - t0
    tok_s = args["num_samples"] * args["max_new_tokens"] / dt
    kv_mb = model.kv_cache_bytes(1, M, torch.bfloat16 if dtype == "bfloat16" else torch.float32,
                                 args["kv_sharing"]) / 2**20
    rows.append((name, model.effective_depth(M), f"{tok_s:.1f}", f"{kv_mb:.2f}"))
    print(f"\n━━━ {name} | effective depth {model.effective_depth(M)} | {tok_s:.1f} tokens/s ━━━")
    for i, text in enumerate(texts):
        if i:
            print("  ---")
        print(start + text)
    if used:  # loops per decoded token (an exit, or MoR's routing): mean and a histogram line
        flat = [u for step in used for u in step]
        hist = "  ".join(f"{n}:{flat.count(n)}" for n in range(1, M + 1) if flat.count(n))
        what = "exit " + args["exit"] if exit else "MoR routing"
        print(f"  [{what}] loops per token: mean {sum(flat) / len(flat):.2f} of {M} | histogram (loops:tokens) {hist}")
print()
print(print_table(rows, ["route", "depth", "tokens/s", f"KV MiB ({args['kv_sharing']})"]))
