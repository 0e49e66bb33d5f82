"""
The GPU check: one prepared command for a short window on a GPU. Does
`torchrun train.py --config flt_small` train fast and correctly there?

    python tests/gpu_check.py --out_dir=DIR                  # one GPU, at most time_limit = 450 s
    python tests/gpu_check.py --out_dir=DIR --device=cpu     # the same steps, shortened: a rehearsal

It needs only PyTorch, numpy, tiktoken and tqdm, and no network: the built-in corpus stands
in for FineWeb-Edu (the models keep their GPT-2-sized vocabulary, so every matmul has the
paper's shape). In order, each step written to DIR/gpu_check.json as soon as it is done; a
step that fails is recorded with its error and the next one runs; a step that cannot start
with enough of time_limit left is skipped, and a run still going at the deadline is killed:

1. device, torch and CUDA versions; a bf16 8192³ matmul's TFLOP/s beside the datasheet peak.
2. training runs, each `torchrun --standalone --nproc_per_node=1 train.py --config NAME` for
   `steps` steps on one micro-batch per step: flt_small and a plain stack of flt_small's depth
   (6 x 12 = 72 blocks, the same FLOPs), each with its blocks compiled (train.py's default)
   and with the whole step compiled (compile_scope=step), for MFU and the looped / plain step
   time ratio (eager instead of both with --compile=False); huginn_small compiled (sampled depth, truncated backprop, the adapter, a random
   initial state). Tokens/s, MFU against the bf16 peak, peak memory, first and last loss. A
   run that runs out of memory is retried at half the batch. Then the step breakdown:
   forward + backward and the optimizer step timed apart, looped against plain, in-process;
   and the loss memory: the head and cross-entropy of one flt_small micro-batch with the whole
   logits against train.py's chunked loss (loss_chunk), peak memory, time and the two losses.
3. decoding with the trained flt_small in bf16 at B=1 and B=8: the KV cache replayed as a
   CUDA graph, the same cache launched eagerly, no cache: tokens/s; whether cached and
   uncached greedy tokens agree (in fp32), and how far the cache's logits are from the full
   forward's (bf16 and fp32), on the same tokens.
   Then eval.py's scoring at FLT's budgets 1, 3, 6, 9, 12 in one pass: tokens/s, and what
   that makes CORE take (an estimate from CORE's size, the bundle is not there offline).
4. bf16 autocast against fp32: flt_small from the same init on the same batches; every
   step's loss must stay within BF16_TOLERANCE of the fp32 one.
5. fsdp=True (FSDP2 over NCCL, one process): flt_small compiled, its losses against the run
   without it (within BF16_TOLERANCE at every step).
6. (--peers=DIR only, a call of its own: compiling the peers takes minutes) loopgpt's
   training step beside the FLT code's and nanochat's on this GPU: tests/peer_step.py with
   DIR/FullyLoopedTransformer and DIR/nanochat, checkouts carried to the machine.

Prints a table last; DIR/gpu_check.log keeps every run's output. --only=decode,... runs
only the named steps of STEPS (decode, kv sharing and eval speed bring the flt_small run they need).
"""

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from configs import (autocast_context, detect_device, fail, gpu_peak_flops, make_dir, model_config_defaults,  # noqa: E402
                     parse_args, print_table, train_config_defaults)
from loopgpt import (LoopGPT, LoopGPTConfig, configure_optimizer, flops_per_token, load_checkpoint,  # noqa: E402
                     model_from_checkpoint)
from sample import generate, kv_cache_bytes  # noqa: E402
from data.common import token_dtype  # noqa: E402

FLT_RUNS = ("flt_small compiled", "flt_small step-compiled", "flt_small eager")  # decoding reads the first trained
BF16_TOLERANCE = 0.01  # |loss_bf16 - loss_fp32| <= 1% of loss_fp32 at every step
RUNS = ("flt_small compiled", "flt_small step-compiled", "flt_small eager", "plain compiled", "plain step-compiled",
        "plain eager", "huginn_small compiled", "fsdp")
STEPS = ("flt_small compiled", "flt_small step-compiled", "flt_small eager", "plain", "step breakdown", "loss memory",
         "decode", "kv sharing", "eval speed", "bf16 vs fp32", "huginn_small compiled", "fsdp", "peers")

args, _ = parse_args(sys.argv[1:], {
    "out_dir": "",        # where gpu_check.json and gpu_check.log go
    "device": "",         # "" = cuda if available
    "steps": 0,           # training steps per run; 0 = 50 on a GPU, 3 on a CPU
    "time_limit": 450,    # seconds for the whole check: a step that would not fit is skipped
    "shrink": "",         # --key=value settings added to every run (a CPU rehearsal's smaller model)
    "compile": True,      # False: skip the compiled runs (a quick CPU rehearsal)
    "only": "",           # run only these steps (comma-separated names from STEPS); "" = all
    "peers": "",          # a folder with checkouts FullyLoopedTransformer/ and nanochat/: step 5
}, allow_config=False)
if not args["out_dir"]:
    fail("say where the results go: --out_dir=DIR")
if args["steps"] < 0 or args["time_limit"] <= 0:
    fail("need steps >= 0 (0 = 50 on a GPU, 3 on a CPU) and time_limit > 0 seconds")
only = {s for s in args["only"].split(",") if s}
if only - set(STEPS):
    fail(f"--only={args['only']}: the steps are {', '.join(STEPS)}")
if only & {"decode", "kv sharing", "eval speed"} and not only & set(FLT_RUNS):
    only.add(FLT_RUNS[0] if args["compile"] else "flt_small eager")  # they decode and score with the flt_small it trains
device = detect_device(args["device"])
gpu = device.startswith("cuda")
deadline = time.time() + args["time_limit"]
steps = args["steps"] or (50 if gpu else 3)
# on a CPU everything is shortened: the same code paths on a small context and batch
shrink = ([] if gpu else ["--block_size=64", "--batch_size=1"]) + args["shrink"].split()
make_dir(args["out_dir"])
work = tempfile.mkdtemp(prefix="loopgpt-gpu-check-")  # checkpoints stay out of out_dir
data_dir = os.path.join(work, "pydoc")
log_path = os.path.join(args["out_dir"], "gpu_check.log")
open(log_path, "w").close()
results = {"device": device, "steps": steps, "shrink": shrink, "bf16_tolerance": BF16_TOLERANCE}


def save():
    with open(os.path.join(args["out_dir"], "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)


def log(text):
    with open(log_path, "a") as f:
        f.write(text + "\n")


def step(name, fn, need_s=20):
    """Run one step of the check; its result or its error goes into results[name]."""
    if only and name not in only | {"environment", "data"} and not (name.startswith("plain ") and "plain" in only):
        return
    left = deadline - time.time()
    if left < need_s:
        results[name] = {"skipped": f"time limit ({left:.0f} s left, needs ~{need_s} s)"}
    else:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        t0 = time.time()
        try:
            results[name] = fn()
        except Exception as e:  # record it and go on: one failure must not waste the window
            log(traceback.format_exc())
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        results[name]["seconds"] = round(time.time() - t0, 1)
    brief = {k: v for k, v in results[name].items() if not isinstance(v, (list, dict)) and k != "checkpoint"}
    print(f"    {json.dumps(brief)[:400]}", flush=True)
    save()


def sync():
    if gpu:
        torch.cuda.synchronize()


# ---- 1. the device ------------------------------------------------------------------------

def environment():
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "threads": torch.get_num_threads()}
    n = 8192 if gpu else 512
    if gpu:
        props = torch.cuda.get_device_properties(device)
        peak, name = gpu_peak_flops(device)
        info.update(name=name, memory_gb=props.total_memory / 2 ** 30, sms=props.multi_processor_count,
                    datasheet_bf16_tflops=peak / 1e12 if peak else None)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync()
    t0, reps = time.perf_counter(), 20 if gpu else 2
    for _ in range(reps):
        a @ b
    sync()
    info[f"matmul_bf16_{n}_tflops"] = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
    return info


# ---- 2. training runs ------------------------------------------------------------------------

def prepare_data():
    """The built-in corpus; on a Python without pydoc_data, the repository's own text."""
    try:
        from data.pydoc.prepare import prepare
        prepare(out_dir=data_dir)
    except ImportError:
        from data.common import write_dataset
        from data.tokenizer import tokenizer_to_dict, train_bpe
        docs = []
        for folder, _, files in sorted(os.walk(ROOT)):
            docs += [open(os.path.join(folder, f), encoding="utf-8").read() for f in sorted(files)
                     if f.endswith((".py", ".md")) and "/." not in folder]
        write_dataset(data_dir, docs[:-4], docs[-4:], tokenizer_to_dict(train_bpe(docs[:-4], 2048)),
                      {"source": "loopgpt's own files"})
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    return {"source": meta["source"], "train_tokens": meta["train_tokens"], "val_tokens": meta["val_tokens"]}


def val_tokens():
    """The prepared corpus's val split, in the dtype its meta.json records (uint16 when none)."""
    with open(os.path.join(data_dir, "meta.json")) as f:
        dtype = token_dtype(json.load(f))
    return np.memmap(os.path.join(data_dir, "val.bin"), dtype=dtype, mode="r")


def settings(config, extra):
    """The settings train.py will use for --config config + extra."""
    values, _ = parse_args([f"--config={config}", *extra], {**train_config_defaults(), **model_config_defaults()})
    return values


def train(name, config, *extra, cap_s=240):
    """`torchrun ... train.py --config config` for `steps` steps; tokens/s, MFU, memory, loss."""
    extra = [f"--data_dir={data_dir}", f"--device={device}", f"--max_iters={steps}", f"--eval_interval={steps}",
             "--eval_iters=2", "--log_interval=1", "--grad_accum_steps=1", "--warmup_iters=10", *shrink, *extra]
    batch = settings(config, extra)["batch_size"]
    while True:
        out = os.path.join(work, name)
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
               f"--config={config}", *extra, f"--batch_size={batch}", f"--out_dir={out}"]
        log(f"\n$ {' '.join(cmd[1:])}")
        timeout = max(1, min(cap_s, deadline - time.time()))
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun stops its workers when it gets SIGTERM (they run in sessions of their
            # own, so killing torchrun's would orphan them, holding the GPU for later steps)
            proc.terminate()
            try:
                stdout, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
            log(stdout + stderr)
            return {"error": f"timed out after {timeout:.0f} s", "batch_size": batch}
        log(stdout + stderr)
        if proc.returncode == 0:
            break
        if "out of memory" in stderr.lower() and batch > 1:
            results.setdefault("out_of_memory", []).append(f"{name} at batch_size={batch}")
            batch //= 2  # the same run at half the batch: memory then tells what fits
            continue
        lines = [line for line in stderr.splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}", "batch_size": batch}
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    conf = next(r for r in records if r["type"] == "config")
    train_records = [r for r in records if r["type"] == "train"]
    timed = train_records[max(1, len(train_records) // 5):]  # the first steps compile and warm up
    with torch.device("meta"):
        model = LoopGPT(LoopGPTConfig(**conf["model"]))
    seconds = sum(r["step_ms"] for r in timed) / 1000
    flops = sum(flops_per_token(model, max(1, round(r["loops"]))) for r in timed) * conf["tokens_per_step"]
    peak = gpu_peak_flops(device)[0] if gpu else None
    val = next(r for r in reversed(records) if r["type"] == "eval")["val"]
    return {"config": config, "args": extra, "batch_size": batch, "block_size": conf["model"]["block_size"],
            "compile": conf["train"]["compile"], "dtype": conf["dtype"], "params_m": model.num_params() / 1e6,
            "tokens_per_step": conf["tokens_per_step"], "step_ms": statistics.median(r["step_ms"] for r in timed),
            "tokens_per_s": conf["tokens_per_step"] * len(timed) / seconds,
            "mfu": flops / seconds / peak if peak else None, "mean_loops": statistics.mean(r["loops"] for r in timed),
            "peak_mem_gb": train_records[-1]["peak_mem_mb"] / 1024 if gpu else None,
            "loss_first": train_records[0]["loss"], "loss_last": train_records[-1]["loss"],
            "val_loss": {M: v["loss"] for M, v in val.items()}, "losses": [r["loss"] for r in train_records],
            "checkpoint": os.path.join(out, "ckpt.pt")}


def step_breakdown():
    """Where a training step's time goes: forward + backward and the optimizer step timed
    apart, flt_small (6 blocks x 12 loops) against the plain 72-block stack of the same FLOPs,
    in this process (compiled blocks, bf16, Muon as flt_small trains, half of its batch)."""
    from loopgpt import compile_blocks
    flt = settings("flt_small", shrink)
    B, T = max(1, flt["batch_size"] // 2), flt["block_size"]
    model_keys = {k: flt[k] for k in model_config_defaults()}
    depth = flt["n_prelude"] + flt["n_core"] * flt["n_loops"] + flt["n_coda"]
    out = {"batch_size": B, "block_size": T}
    x, y = (torch.randint(0, flt["vocab_size"], (B, T), device=device) for _ in range(2))
    bf16, _ = autocast_context(device, "bfloat16")
    for name, keys in (("looped", {}), ("plain", dict(n_core=depth, n_prelude=0, n_coda=0, n_loops=1, injection="none"))):
        torch.manual_seed(0)
        model = LoopGPT(LoopGPTConfig(**{**model_keys, **keys})).to(device)
        if args["compile"]:
            compile_blocks(model)
        opt = configure_optimizer(model, flt["weight_decay"], flt["learning_rate"], (flt["beta1"], flt["beta2"]),
                                        flt["optimizer"], flt["muon_lr"], flt["embedding_lr"], flt["head_lr"],
                                        flt["adam_eps"])

        def fwd_bwd():
            with bf16:
                loss = model(x, y)[1]
            loss.backward()

        def timed(fn, n=5 if gpu else 1):
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            return 1000 * (time.perf_counter() - t0) / n
        for _ in range(3 if gpu else 1):  # warm-up: compilation, allocator, optimizer state
            fwd_bwd()
            opt.step()
        out[f"{name}_fwd_bwd_ms"], out[f"{name}_opt_step_ms"] = timed(fwd_bwd), timed(opt.step)
        if hasattr(opt, "batched"):  # Muon one matrix at a time, as before it batched same-shape matrices
            opt.batched = False
            out[f"{name}_opt_step_unbatched_ms"] = timed(opt.step)
            opt.batched = None
        out[f"{name}_muon_matrices"] = sum(len(g["params"]) for g in opt.param_groups if g.get("use_muon"))
        if gpu:  # how much of a whole step the GPU is busy: kernel time over wall time
            out[f"{name}_gpu_busy"] = gpu_busy(lambda: (fwd_bwd(), opt.step(), opt.zero_grad(set_to_none=True)))
        del model, opt
    out["plain_over_looped_fwd_bwd"] = out["plain_fwd_bwd_ms"] / out["looped_fwd_bwd_ms"]
    return out


def gpu_busy(fn, n=3):
    """The fraction of fn's wall time the GPU spends in kernels, from torch.profiler: the
    kernels of one stream do not overlap, so their summed time is the time the GPU is busy.
    Below 1, the GPU waits for Python to launch the next kernel (or for the CPU)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        wall_us = 1e6 * (time.perf_counter() - t0)
    kernels_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    return kernels_us / wall_us


def loss_memory():
    """train.py's loss on one flt_small micro-batch (32 x 1024 tokens, d=384, vocab 50,304, bf16):
    the head, soft-cap and cross-entropy forward + backward on their own, with the whole logits
    (loss_chunk=0) and in chunks of the default loss_chunk (4 chunks here at least, for a CPU
    rehearsal's small batch): peak memory above the inputs, time, the two losses and grad_h."""
    flt = settings("flt_small", shrink)
    N = flt["batch_size"] * flt["block_size"]
    rows = min(train_config_defaults()["loss_chunk"], max(1, N // 4))
    torch.manual_seed(0)
    model = LoopGPT(LoopGPTConfig(**{k: flt[k] for k in model_config_defaults()})).to(device)
    h = torch.randn(N, flt["n_embd"], device=device, requires_grad=True)  # (the final norm's output)
    y = torch.randint(0, flt["vocab_size"], (N,), device=device)
    bf16, _ = autocast_context(device, "bfloat16")
    out, grad_h = {"tokens": N, "loss_chunk": rows}, {}
    for name, chunk in (("whole", 0), ("chunked", rows)):
        def fwd_bwd():
            h.grad = model.lm_head.weight.grad = None
            with bf16:
                loss = model.chunked_loss(h, y, chunk) if chunk else F.cross_entropy(model.logits(h), y)
            loss.backward()
            return loss.item()
        fwd_bwd()  # warm-up
        sync()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out[f"{name}_loss"] = fwd_bwd()
        sync()
        out[f"{name}_ms"] = 1000 * (time.perf_counter() - t0)
        out[f"{name}_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if gpu else None
        grad_h[name] = h.grad
    out["loss_rel_diff"] = abs(out["chunked_loss"] - out["whole_loss"]) / out["whole_loss"]
    out["grad_h_max_diff_rel"] = ((grad_h["chunked"] - grad_h["whole"]).abs().max() / grad_h["whole"].abs().max()).item()
    return out


# ---- 3. decoding ---------------------------------------------------------------------------

def decode():
    """Greedy decoding at the train budget, B=1 and B=8 (bf16): the KV cache with its CUDA
    graph, the same cache launched eagerly, and no cache. Whether cached and uncached greedy
    tokens agree is asked in fp32, where the two differ only by rounding (in bf16 a near-tie
    can flip)."""
    run = next((results[k] for k in FLT_RUNS if "checkpoint" in results.get(k, {})),
               None)
    if run is None:
        raise RuntimeError("no flt_small run finished: nothing trained to decode with")
    model = model_from_checkpoint(load_checkpoint(run["checkpoint"])).to(device).eval()
    M, n_new, P = model.config.n_loops, (128 if gpu else 4), 16
    val = val_tokens()
    bf16, _ = autocast_context(device, "bfloat16")
    fp32, _ = autocast_context(device, "float32")
    out = {"loops": M, "new_tokens": n_new, "prompt_tokens": P}
    modes = {"graph": dict(cuda_graph=True), "cache": dict(cuda_graph=False), "no_cache": dict(use_cache=False)}
    if not gpu:
        del modes["graph"]
    for B in (1, 8):
        prompt = torch.from_numpy(val[:B * P].astype(np.int64)).view(B, P).to(device)
        tokens = {}
        for mode, kw in modes.items():
            with bf16:
                generate(model, prompt, 2, loops=M, temperature=0, **kw)  # warm-up
                sync()
                t0 = time.perf_counter()
                tokens[mode] = generate(model, prompt, n_new, loops=M, temperature=0, **kw)
                sync()
            out[f"B{B}_{mode}_tok_s"] = B * n_new / (time.perf_counter() - t0)
        fast = "graph" if gpu else "cache"
        out[f"B{B}_cache_speedup"] = out[f"B{B}_{fast}_tok_s"] / out[f"B{B}_no_cache_tok_s"]
        differ = (tokens[fast] != tokens["no_cache"]).any(0).nonzero()
        out[f"B{B}_bf16_first_difference"] = int(differ[0]) - P if len(differ) else None
    # fp32: cached (the graph on a GPU) against uncached greedy tokens, B=8
    n_check = 32 if gpu else 4
    with fp32:
        a = generate(model, prompt, n_check, loops=M, temperature=0)
        b = generate(model, prompt, n_check, loops=M, temperature=0, use_cache=False)
    differ = (a != b).any(0).nonzero()
    out["fp32_greedy_tokens"] = n_check
    out["fp32_first_difference"] = int(differ[0]) - P if len(differ) else None
    # the cache's logits against the full forward's, token by token on the same sequence
    seq = a[:1]  # the fp32 cached tokens
    for name, ctx in (("bf16", bf16), ("fp32", autocast_context(device, "float32")[0])):
        with torch.inference_mode(), ctx:
            full = model(seq[:, :-1], loops=M)[0][:, P - 1:]
            cache = model.new_cache(M)
            cached = [model(seq[:, :P], loops=M, cache=cache)[0][:, -1]]
            cached += [model(seq[:, t:t + 1], loops=M, cache=cache)[0][:, -1] for t in range(P, seq.size(1) - 1)]
            out[f"cache_logits_max_abs_diff_{name}"] = (torch.stack(cached, 1) - full).abs().max().item()
            out[f"cache_dtype_{name}"] = str(cache.k.dtype).replace("torch.", "")
    return out


def kv_sharing():
    """Decoding with the KV cache shared across loops (kv_sharing='last') against the exact
    one, eagerly (sharing has no CUDA graph), B=8, bf16, at the train budget and twice it: the
    cache's bytes, the allocator's peak during generation, and tokens/s."""
    run = next((results[k] for k in FLT_RUNS if "checkpoint" in results.get(k, {})),
               None)
    if run is None:
        raise RuntimeError("no flt_small run finished: nothing trained to decode with")
    model = model_from_checkpoint(load_checkpoint(run["checkpoint"])).to(device).eval()
    L, n_new, P, B = model.config.n_loops, (64 if gpu else 4), 16, 8
    val = val_tokens()
    prompt = torch.from_numpy(val[:B * P].astype(np.int64)).view(B, P).to(device)
    bf16, _ = autocast_context(device, "bfloat16")
    out = {"batch": B, "new_tokens": n_new}
    for M in (L, 2 * L):
        for sharing in ("none", "last"):
            with bf16, torch.inference_mode():
                generate(model, prompt, 2, loops=M, temperature=0, cuda_graph=False, kv_sharing=sharing)  # warm-up
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                sync()
                t0 = time.perf_counter()
                generate(model, prompt, n_new, loops=M, temperature=0, cuda_graph=False, kv_sharing=sharing)
                sync()
                tag = f"M{M}_{sharing}"
                out[f"{tag}_tok_s"] = B * n_new / (time.perf_counter() - t0)
                out[f"{tag}_cache_mib"] = kv_cache_bytes(model, B, M, torch.bfloat16, sharing) / 2**20
                if gpu:
                    out[f"{tag}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


# ---- 3b. evaluation speed ---------------------------------------------------------------------

# CORE's 204,534 scored sequences (91,037 items) hold about 125M tokens once its 10-shot
# prompts are cropped to a 1024-token context: an estimate from the tasks' item sizes, not a count
CORE_TOKENS_ESTIMATE = 125e6


def eval_speed():
    """eval.py's scoring with the trained flt_small at FLT's budgets 1, 3, 6, 9, 12 (bf16), on
    sequences of real text: tokens/s, and CORE's time at that rate (an estimate)."""
    import eval as ev
    run = next((results[k] for k in FLT_RUNS if "checkpoint" in results.get(k, {})),
               None)
    if run is None:
        raise RuntimeError("no flt_small run finished: nothing trained to evaluate")
    model = model_from_checkpoint(load_checkpoint(run["checkpoint"])).to(device).eval()
    n, T = (512, 512) if gpu else (8, 32)
    val = val_tokens()
    rows = [(val[i * T:(i + 1) * T].astype(np.int64).tolist(), T // 2, T) for i in range(n)]  # score the 2nd half
    routes = [(f"M={M}", {"loops": M}) for M in (1, 3, 6, 9, 12)]
    bf16, _ = autocast_context(device, "bfloat16")
    ev.score_rows(model, rows[:8], routes, device, bf16, 16384)  # warm-up
    sync()
    t0 = time.perf_counter()
    ev.score_rows(model, rows, routes, device, bf16, 16384)
    sync()
    tok_s = n * T / (time.perf_counter() - t0)
    return {"sequences": n, "tokens_per_sequence": T, "tok_s": tok_s, "core_estimate_s": CORE_TOKENS_ESTIMATE / tok_s}


# ---- 4. bf16 against fp32 -----------------------------------------------------------------------

def bf16_vs_fp32():
    batch = ["--batch_size=8"] if gpu else []
    runs = {dtype: train(f"flt_small {dtype}", "flt_small", "--compile=False", f"--dtype={dtype}", *batch)
            for dtype in ("float32", "bfloat16")}
    if any("losses" not in r for r in runs.values()):
        raise RuntimeError(f"a run failed: {({k: r.get('error') for k, r in runs.items()})}")
    pairs = list(zip(runs["float32"]["losses"], runs["bfloat16"]["losses"]))
    rel = [abs(b - a) / a for a, b in pairs]
    return {"max_rel_diff": max(rel), "mean_rel_diff": statistics.mean(rel), "ok": max(rel) <= BF16_TOLERANCE,
            "loss_fp32": [a for a, _ in pairs], "loss_bf16": [b for _, b in pairs],
            "step_ms_fp32": runs["float32"]["step_ms"], "step_ms_bf16": runs["bfloat16"]["step_ms"]}


# ---- 5. the peers ----------------------------------------------------------------------------

def peers():
    """tests/peer_step.py on this device (a process of its own: the peers' modules, their
    compiled graphs and their memory go with it)."""
    folders = {k: os.path.join(args["peers"], k) for k in ("FullyLoopedTransformer", "nanochat")}
    out = os.path.join(work, "peers.json")
    given = [f"--{'flt' if k == 'FullyLoopedTransformer' else k}={path}" for k, path in folders.items()
             if os.path.isdir(path)]
    if not given:
        return {"error": f"--peers={args['peers']} holds neither FullyLoopedTransformer/ nor nanochat/"}
    cmd = [sys.executable, "tests/peer_step.py", f"--device={device}", f"--out={out}", *given,
           *([] if gpu else ["--size=tiny", "--steps=1", "--compile=False"])]
    log(f"\n$ {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1, deadline - time.time()))
    log(proc.stdout + proc.stderr)
    if proc.returncode:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    with open(out) as f:
        return json.load(f)


# ---- the check --------------------------------------------------------------------------------

flt = settings("flt_small", shrink)
plain = [f"--n_core={flt['n_prelude'] + flt['n_core'] * flt['n_loops'] + flt['n_coda']}", "--n_prelude=0",
         "--n_coda=0", "--n_loops=1", "--injection=none", "--eval_budgets=1"]
looped_budgets = f"--eval_budgets=1,{flt['n_loops']}"
step("environment", environment, need_s=5)
step("data", prepare_data, need_s=5)
if args["compile"]:  # each block compiled (train.py's default), then the whole step as one graph
    step("flt_small compiled", lambda: train("flt_small compiled", "flt_small", "--compile=True", looped_budgets))
    step("flt_small step-compiled", lambda: train("flt_small step-compiled", "flt_small", "--compile=True",
                                                  "--compile_scope=step", looped_budgets), need_s=90)
    step("plain step-compiled", lambda: train("plain step-compiled", "flt_small", "--compile=True",
                                              "--compile_scope=step", *plain), need_s=90)
    step("plain compiled", lambda: train("plain compiled", "flt_small", "--compile=True", *plain))
else:
    step("flt_small eager", lambda: train("flt_small eager", "flt_small", "--compile=False", looped_budgets), need_s=40)
    step("plain eager", lambda: train("plain eager", "flt_small", "--compile=False", *plain), need_s=40)
step("step breakdown", step_breakdown, need_s=60)
step("loss memory", loss_memory, need_s=20)
step("decode", decode, need_s=30)
step("kv sharing", kv_sharing, need_s=30)
step("eval speed", eval_speed, need_s=30)
step("bf16 vs fp32", bf16_vs_fp32, need_s=60)
if args["compile"]:
    step("huginn_small compiled", lambda: train("huginn_small compiled", "huginn_small", "--compile=True",
                                                "--eval_budgets=1,8"), need_s=60)
if args["compile"]:  # FSDP2 on NCCL (one process): the same losses as the compiled DDP-less run, to bf16 noise
    step("fsdp", lambda: train("fsdp", "flt_small", "--compile=True", "--fsdp=True", looped_budgets), need_s=60)
if args["peers"]:
    step("peers", peers, need_s=120)
shutil.rmtree(work, ignore_errors=True)

# ---- the tables -------------------------------------------------------------------------------

def pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


runs = {k: results[k] for k in RUNS if k in results}
rows = []
for name, r in runs.items():
    if "tokens_per_s" in r:
        rows.append((name, f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.0f}", pct(r["mfu"]),
                     "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}", r["batch_size"],
                     f"{r['loss_first']:.2f} -> {r['loss_last']:.2f}"))
    else:
        rows.append((name, r.get("error") or r.get("skipped"), "", "", "", "", ""))
env = results["environment"]
print(f"\nloopgpt GPU check: {env.get('name', device)}, torch {env.get('torch')}, CUDA {env.get('cuda')}; "
      f"{steps} steps a run; every number in {args['out_dir']}/gpu_check.json\n")
print(print_table(rows, ["run", "tokens/s", "ms/step", "MFU (bf16 peak)", "peak GB", "batch", "loss"]))

checks = []  # (what, measured, target, verdict)


def check(what, measured, target="-", ok=None):
    checks.append((what, measured, target, "" if ok is None else "ok" if ok else "MISSED"))


n = 8192 if gpu else 512
if f"matmul_bf16_{n}_tflops" in env:
    peak = env.get("datasheet_bf16_tflops")
    tflops = env[f"matmul_bf16_{n}_tflops"]
    check(f"bf16 matmul {n}³, TFLOP/s", f"{tflops:.3g}", f"datasheet {peak:.0f}" if peak else "-")
for mode in ("compiled", "step-compiled", "eager"):
    looped, base = runs.get(f"flt_small {mode}", {}), runs.get(f"plain {mode}", {})
    if looped.get("mfu") is not None:
        check(f"MFU, flt_small {mode}", pct(looped["mfu"]), ">= 40%", looped["mfu"] >= 0.4)
    if looped.get("peak_mem_gb") is not None:
        check(f"peak memory, flt_small {mode}, {looped['batch_size']} x {looped['block_size']} tokens",
              f"{looped['peak_mem_gb']:.1f} GB", "<= 40 GB", looped["peak_mem_gb"] <= 40)
    if "step_ms" in looped and "step_ms" in base:
        # the loop costs nothing beyond its FLOPs (>= 0.95), nor do 72 blocks' optimizer updates (<= 1.05)
        results[f"plain_over_looped_step_time_{mode}"] = ratio = base["step_ms"] / looped["step_ms"]
        check(f"whole step, plain / looped (same FLOPs), {mode}", f"{ratio:.3f}", "0.95 .. 1.05",
              0.95 <= ratio <= 1.05)
d = results.get("decode", {})
for B in (1, 8):
    if f"B{B}_cache_speedup" in d:
        speedup, fast = d[f"B{B}_cache_speedup"], d.get(f"B{B}_graph_tok_s", d[f"B{B}_cache_tok_s"])
        check(f"decode B={B}, M={d['loops']}, bf16: cache / no cache", f"{speedup:.1f}x ({fast:,.0f}"
              f" / {d[f'B{B}_no_cache_tok_s']:,.0f} tok/s)", *((">= 5x", speedup >= 5) if B == 1 else ()))
        if f"B{B}_graph_tok_s" in d:
            check(f"decode B={B}: CUDA graph / eager cache", f"{d[f'B{B}_graph_tok_s'] / d[f'B{B}_cache_tok_s']:.1f}x "
                  f"({d[f'B{B}_cache_tok_s']:,.0f} tok/s eager)")
k = results.get("kv sharing", {})
for M in sorted({int(key[1:].split("_")[0]) for key in k if key.startswith("M")}):
    check(f"kv_sharing=last vs none, B=8, M={M}: cache MiB, tok/s",
          f"{k[f'M{M}_last_cache_mib']:.0f} vs {k[f'M{M}_none_cache_mib']:.0f} MiB; "
          f"{k[f'M{M}_last_tok_s']:,.0f} vs {k[f'M{M}_none_tok_s']:,.0f} tok/s" +
          (f"; peak {k[f'M{M}_last_peak_mib']:.0f} vs {k[f'M{M}_none_peak_mib']:.0f} MiB" if f"M{M}_last_peak_mib" in k
           else ""))
b = results.get("step breakdown", {})
if "plain_over_looped_fwd_bwd" in b:
    ratio = b["plain_over_looped_fwd_bwd"]
    check("forward + backward, plain / looped (same FLOPs)", f"{ratio:.3f} ({b['plain_fwd_bwd_ms']:.0f} / "
          f"{b['looped_fwd_bwd_ms']:.0f} ms)", ">= 0.95", ratio >= 0.95)
    check("optimizer step, plain / looped (Muon matrices)", f"{b['plain_opt_step_ms']:.0f} / {b['looped_opt_step_ms']:.0f}"
          f" ms ({b['plain_muon_matrices']} / {b['looped_muon_matrices']})" + (
              f"; one matrix at a time {b['plain_opt_step_unbatched_ms']:.0f} / {b['looped_opt_step_unbatched_ms']:.0f} ms"
              if "plain_opt_step_unbatched_ms" in b else ""))
for name in ("looped", "plain"):
    if f"{name}_gpu_busy" in b:
        check(f"GPU busy in a {name} step (profiler: kernel time / wall time)", pct(b[f"{name}_gpu_busy"]), ">= 90%",
              b[f"{name}_gpu_busy"] >= 0.9)
p = results.get("peers", {})
for ours, theirs, target in (("loopgpt flt_small", "FLT code", 1.1), ("loopgpt plain 72x1", "nanochat plain 72x1", None)):
    for name in (ours, theirs):
        if "error" in p.get(name, {}):
            check(f"peers: {name}", p[name]["error"], ok=False)
    if f"{ours} / {theirs}" in p:
        r = p[f"{ours} / {theirs}"]
        check(f"tokens/s, {ours} / {theirs} (same step, same GPU)", f"{r:.2f}x ({p[ours]['tokens_per_s']:,.0f} / "
              f"{p[theirs]['tokens_per_s']:,.0f})", *((f">= {target}x", r >= target) if target else ()))
m = results.get("loss memory", {})
if "chunked_ms" in m:
    memory = f"peak {m['chunked_peak_gb']:.1f} / {m['whole_peak_gb']:.1f} GB, " if gpu else ""
    check(f"loss of {m['tokens']:,} tokens, loss_chunk={m['loss_chunk']} / whole logits", f"{memory}"
          f"{m['chunked_ms']:.0f} / {m['whole_ms']:.0f} ms; losses differ by {m['loss_rel_diff']:.1g} (relative)",
          "< 1e-4", m["loss_rel_diff"] < 1e-4)
if "fp32_first_difference" in d:
    first = d["fp32_first_difference"]
    check(f"decode B=8, fp32: cached greedy tokens = uncached ({d['fp32_greedy_tokens']})",
          "yes" if first is None else f"no, from token {first}", "yes", first is None)
if "cache_logits_max_abs_diff_fp32" in d:
    fp32 = d["cache_logits_max_abs_diff_fp32"]
    check("cached vs full-forward logits, max |diff|", f"bf16 {d['cache_logits_max_abs_diff_bf16']:.2g}, "
          f"fp32 {fp32:.2g}", "fp32 < 1e-3", fp32 < 1e-3)
f, ref = results.get("fsdp", {}), results.get("flt_small compiled", {})
if "losses" in f and "losses" in ref and len(f["losses"]) == len(ref["losses"]):
    diff = max(abs(a - b) / b for a, b in zip(f["losses"], ref["losses"]))
    check(f"fsdp=True, flt_small compiled, {len(f['losses'])} steps: loss vs without, max relative diff", pct(diff),
          f"<= {pct(BF16_TOLERANCE)}", diff <= BF16_TOLERANCE)
c = results.get("bf16 vs fp32", {})
if "max_rel_diff" in c:
    check(f"bf16 vs fp32 loss over {len(c['loss_bf16'])} steps, max relative diff", pct(c["max_rel_diff"]),
          f"<= {pct(BF16_TOLERANCE)}", c["ok"])
e = results.get("eval speed", {})
if "tok_s" in e:
    check("eval.py at budgets 1,3,6,9,12 (one pass), bf16", f"{e['tok_s']:,.0f} tok/s; CORE ~{e['core_estimate_s'] / 60:.0f}"
          f" min (estimate)")
for name in ("step breakdown", "loss memory", "decode", "kv sharing", "eval speed", "bf16 vs fp32", "fsdp", "peers"):
    if "error" in results.get(name, {}) or "skipped" in results.get(name, {}):
        check(name, results[name].get("error") or results[name]["skipped"], ok=False)
save()
print()
print(print_table(checks, ["check", "measured", "target", "verdict"]))
