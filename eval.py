"""
Evaluate a checkpoint the way the papers do, at every loop budget, in one command.

    python eval.py --out_dir=out                                # bits per byte on held-out text, M = 1..2L
    python eval.py --out_dir=out --tasks=core --budgets=1,3,6,9,12    # CORE (DCLM's 22 tasks), FLT's budgets
    python eval.py --out_dir=out --tasks=flt                    # FLT's Table 1: CORE's tasks, WikiText-2, bpb
    python eval.py --out_dir=out --tasks=hellaswag,arc_easy:0,my_task.jsonl --schedule=3,2,2,1 --exit=kl:1e-3
    python eval.py --out_dir=out --sweep_max_steps=4            # LoopFormer: + every schedule of <= 4 steps
    python eval.py --runs=out-lt,out-lti,out-flt --plot_file=budgets.png  # compare runs: a table and a plot
    python eval.py --runs='out-exp/*'                           # (a quoted pattern: every run under out-exp)
    python eval.py --out_dir=out --tasks=lens                   # what changes from one loop to the next
    torchrun --nproc_per_node=8 eval.py --out_dir=out --tasks=core    # items split over the processes

Tasks (`--tasks`, comma-separated):
  bpb          the held-out split (val.bin) of the checkpoint's own dataset: bits per byte;
               for a task dataset (data/tasks) its rows' answers, with exact match per group
  wikitext2    WikiText-2 test (the tokenized v1 text the FLT code reads, a document token
               before each line): token-level perplexity and bits per byte, every token
               scored once by a sliding window at the model's block size (--stride, default
               half of it; --stride=BLOCK_SIZE gives the FLT code's non-overlapping windows)
  core         CORE (Li et al. 2024, DataComp-LM, arXiv 2406.11794, as nanochat computes it):
               22 tasks of the DCLM eval bundle; each task's accuracy is centered against
               its random baseline, (acc - r) / (1 - r), and CORE is their mean
  flt          core + wikitext2 + bpb: the columns of the FLT paper's Table 1
  lens         the held-out split read through sample.py's lens (docs/lens.md): per loop t of one
               forward to the largest budget, the fraction of predictions that still change,
               KL(p_t || p_M), the state's movement, and past the train budget L its KL and
               distance to loop L's (settle or drift); --runs=... --metric=lens plots them per run
  loopformer   the zero-shot tasks of the LoopFormer paper that the bundle has
  NAME[:SHOTS] one task of the bundle, by its CORE label, optionally with another shot count
  FILE.jsonl   your own task in the bundle's format; its type is read from its fields

Scoring follows the bundle's three task types (as nanochat does): multiple choice (the
choice with the lowest mean loss over its tokens wins), schema (the context option under
which the shared continuation has the lowest mean loss wins) and language modelling
(right when greedy decoding would write the whole continuation). Few-shot examples are
drawn per item with a generator seeded by the item's index, never the item itself.

Routes (the columns): every budget in --budgets (uniform steps; one pass to the largest
budget reads the smaller ones off its loop states where that is exact), every LoopFormer
schedule in --schedule, and every per-token exit in --exit (run at the largest budget,
teacher-forced one position at a time through the KV cache; the mean loops used are reported),
and with --kv_sharing=last,mean,... every budget again, teacher-forced one position at a time
through a cache whose K/V are shared across loops (what that memory saving costs; `none` is
the exact cache and reproduces the budget's column).

The budget sweep: with every budget 1..L among the routes, the fit of each text task's loss
over them (Parcae: ε(M) ≈ ε∞ + A e^(-kM)); with --sweep_max_steps=N (LoopFormer), every
schedule of 2..min(N, L-1) steps on the 1/L grid, a table of the best, worst and spread per
step count. train.py --eval_only=True --resume=True runs the same (budget_sweep) on its val batches.

Output: one table (rows tasks, columns routes), a JSONL record appended to OUT_DIR/eval.jsonl
(with the fits and grid schedules under "sweep") and a plot of every metric against the budget
(OUT_DIR/eval.png).

Comparing runs (--runs=A,B,...): a table of each run's last training eval from its
log.jsonl (val loss at the train budget and at every budget it evaluated, and the residual
state's RMS per loop, the FLT paper's stability diagnostic), then --metric against M from
each run's latest eval.jsonl as one plot (--plot_file) when every run has one. The downloads (the DCLM
eval bundle and WikiText-2) are made by `python data/eval/prepare.py` on a machine with a network.
"""

import csv
import glob
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from configs import autocast_context, detect_device, fail, make_dir, parse_args, parse_exit, parse_schedule, print_table
from loopgpt import check_fits, summary
from sample import decode_with_exit, kv_cache_bytes, lens, new_cache, open_model, small
from data.common import token_dtype
from data.tokenizer import token_byte_lengths

ROOT = os.path.dirname(os.path.abspath(__file__))
EVAL_DATA = os.path.join(ROOT, "data", "eval")  # what data/eval/prepare.py downloads
PREPARE = "python data/eval/prepare.py"

# FLT's Table 1 = CORE (whose tasks include LAMBADA 0-shot, PIQA / HellaSwag / ARC 10-shot,
# OpenBookQA 0-shot) + WikiText-2 + bpb. LoopFormer's zero-shot table, where the bundle has
# the task (RACE, SciQ and SIQA are not in it: pass them as your own .jsonl files)
PRESETS = {
    "flt": ["core", "wikitext2", "bpb"],
    "loopformer": ["copa", "hellaswag_zeroshot", "lambada_openai", "openbook_qa", "piqa:0", "arc_easy:0",
                   "arc_challenge:0", "winogrande", "bpb"],
}
TEXT_TASKS = ("bpb", "wikitext2")
LENS = "lens"  # eval_lens: the per-loop lens over the held-out text (eval.py only, not a training eval)


# ---- tasks: what to evaluate ------------------------------------------------------------

def core_table(data_dir, wanted="core"):
    """The CORE tasks of the DCLM eval bundle: {label: task}, read from the bundle's own
    core.yaml (which tasks, their type, shots and delimiter) and eval_meta_data.csv (each
    task's random-guess accuracy in percent). `wanted` names the task that needs it."""
    bundle = os.path.join(data_dir, "eval_bundle")
    config, meta = os.path.join(bundle, "core.yaml"), os.path.join(bundle, "eval_meta_data.csv")
    if not (os.path.isfile(config) and os.path.isfile(meta)):
        unknown = "" if wanted in ("core", *PRESETS) else (
            f"'{wanted}' is no built-in task (bpb, wikitext2, core, {', '.join(PRESETS)}, FILE.jsonl), so a bundle task; ")
        fail(f"--tasks: {unknown}the DCLM eval bundle is not in {bundle}: download it on a machine with a network "
             f"with: {PREPARE}")
    try:
        import yaml  # only for the bundle's config; see the README's dependency list
    except ImportError:
        fail("reading the DCLM eval bundle's core.yaml needs PyYAML: pip install pyyaml")
    try:
        with open(config, encoding="utf-8") as f:
            tasks = yaml.safe_load(f)["icl_tasks"]
        with open(meta, encoding="utf-8") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
        table = {}
        for t in tasks:
            table[t["label"]] = dict(
                label=t["label"], path=os.path.join(bundle, "eval_data", t["dataset_uri"]), kind=t["icl_task_type"],
                shots=int(t["num_fewshot"][0]), delimiter=t.get("continuation_delimiter", " "),
                baseline=baselines[t["label"]] / 100, core=True)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        fail(f"the eval bundle in {bundle} is incomplete or corrupt ({type(e).__name__}: {e}); "
             f"delete it and download it again with: {PREPARE}")
    return table


def task_kind(item):
    """A task's type from its items' fields (the bundle's three formats)."""
    if {"query", "choices", "gold"} <= item.keys():
        return "multiple_choice"
    if {"context_options", "continuation", "gold"} <= item.keys():
        return "schema"
    if {"context", "continuation"} <= item.keys():
        return "language_modeling"
    raise ValueError(f"an item with fields {sorted(item)} is none of: multiple choice (query, choices, gold), "
                     "schema (context_options, continuation, gold), language modelling (context, continuation)")


def resolve_tasks(spec, data_dir, allow_lens=False):
    """--tasks -> an ordered list of task dicts (text tasks are {"label": "bpb"} etc.).
    allow_lens: eval.py's command line takes the lens (train.py's evals do not)."""
    names = []
    for name in (s.strip() for s in spec.split(",")):
        names.extend(PRESETS.get(name, [name]) if name else [])
    if not names:
        fail("--tasks is empty (e.g. --tasks=bpb, --tasks=core, --tasks=hellaswag,arc_easy:10)")
    table, tasks = None, []
    for name in names:
        if name in TEXT_TASKS:
            tasks.append({"label": name, "kind": "text"})
            continue
        if name == LENS:
            if not allow_lens:
                fail("--eval_tasks: the lens is eval.py's (python eval.py --tasks=lens), not a training eval")
            tasks.append({"label": name, "kind": "lens"})
            continue
        base, _, shots = name.rpartition(":") if ":" in name else (name, "", "")
        if shots and not shots.isdigit():
            fail(f"--tasks: '{name}': the shot count after ':' must be an integer >= 0")
        if base.endswith(".jsonl"):
            if not os.path.isfile(base):
                fail(f"--tasks: no task file {base}")
            task = dict(label=os.path.basename(base)[:-6], path=base, kind=None, shots=0, delimiter=" ",
                        baseline=None, core=False)
        else:
            table = table or core_table(data_dir, base)
            if base == "core":
                tasks.extend(table.values())
                continue
            if base not in table:
                fail(f"--tasks: unknown task '{base}' (valid: bpb, wikitext2, core, {', '.join(PRESETS)}, "
                     f"a .jsonl file, or one of the bundle's: {', '.join(table)})")
            task = dict(table[base])
        if shots and int(shots) != task["shots"]:
            task.update(label=f"{task['label']}:{shots}", shots=int(shots), core=False)
        tasks.append(task)
    seen = set()
    return [t for t in tasks if not (t["label"] in seen or seen.add(t["label"]))]  # first of duplicates


def load_items(task):
    """The task's items (a list of dicts, one JSON object per line); sets task['kind']."""
    try:
        with open(task["path"], encoding="utf-8") as f:
            items = [json.loads(line) for line in f if line.strip()]
        kinds = {task_kind(item) for item in items}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, AttributeError) as e:
        fail(f"task {task['label']}: cannot read {task['path']}: {str(e).splitlines()[0]}")
    if not items or len(kinds) > 1 or (task["kind"] and kinds != {task["kind"]}):
        fail(f"task {task['label']}: {task['path']} needs items of one type"
             + (f" ({task['kind']})" if task["kind"] else "") + f", found {sorted(kinds) or 'none'}")
    task["kind"] = kinds.pop()
    if task["shots"] >= len(items):
        fail(f"task {task['label']}: {task['shots']} shots need more than the {len(items)} items it has")
    return items


# ---- prompts: the text of every choice ------------------------------------------------------

def fewshot_examples(items, i, shots):
    """The few-shot examples for item i: `shots` other items, drawn with a generator
    seeded by i (the same for every model, budget and run)."""
    if shots == 0:
        return []
    # nanochat samples from the list of the other indices; sampling positions in a range of
    # the same length picks the same positions, without building that list for every item
    positions = random.Random(1234 + i).sample(range(len(items) - 1), shots)
    return [items[j + (j >= i)] for j in positions]


def render(item, kind, examples, delimiter):
    """The texts to score for one item, as (context, continuation) pairs, one per choice.
    Few-shot examples come first, each ending in a blank line, written with their right answer."""
    if kind == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in examples)
        return [(f"{shots}{item['query']}{delimiter}", choice) for choice in item["choices"]]
    if kind == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in examples)
        return [(f"{shots}{option}{delimiter}", item["continuation"]) for option in item["context_options"]]
    shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in examples)
    return [(f"{shots}{item['context'].strip()}{delimiter}", item["continuation"])]


def common_prefix(seqs):
    n = min(map(len, seqs))
    return next((i for i in range(n) if len({s[i] for s in seqs}) > 1), n)


def tokenize(enc, pairs, kind, block_size):
    """[(tokens, start, end)] per choice: the tokens after the document token, and the
    span [start, end) being scored. A continuation's tokens are where the choices differ:
    after their common prefix (multiple choice: the choices), before their common suffix
    (schema: the shared continuation), after the context's tokens (language modelling;
    the context is tokenized stripped of the delimiter's trailing whitespace, which the BPE
    merges into the continuation's first token). A row longer than block_size keeps its last tokens."""
    rows = [[enc.eot_token] + enc.encode_ordinary(c + x) for c, x in pairs]
    if kind == "multiple_choice":
        start = common_prefix(rows)
        spans = [(start, len(r)) for r in rows]
    elif kind == "schema":
        end = common_prefix([r[::-1] for r in rows])
        spans = [(len(r) - end, len(r)) for r in rows]
    else:
        context = [enc.eot_token] + enc.encode_ordinary(pairs[0][0].strip())
        spans = [(min(common_prefix([context, rows[0]]), len(rows[0]) - 1), len(rows[0]))]
    out = []
    for r, (start, end) in zip(rows, spans):
        crop = max(0, len(r) - block_size)
        start = min(max(1, start - crop), end - crop - 1)  # token 0 has no prediction; never an empty span
        out.append((r[crop:], start, end - crop))
    return out


# ---- routes: logits at every budget, schedule and exit ----------------------------------------

def route_logits(model, idx, routes, where):
    """Yields (route name, logits (N, V) at the N positions where `where` (B, T) is True,
    loops used (B, T) or None), one route at a time, for the routes
    [(name, {"loops": M} | {"schedule": [...]} | {"exit": (kind, x), "loops": M})]."""
    budgets = {r["loops"]: name for name, r in routes if set(r) == {"loops"}}
    if budgets:
        for M, logits in model.logits_at_budgets(idx, list(budgets), where):
            yield budgets[M], logits, None
    for name, r in routes:
        if "schedule" in r:
            yield name, model(idx, schedule=r["schedule"])[0][where], None
        elif "kv_sharing" in r:  # teacher-forced decoding, one token at a time through a shared cache
            cache = new_cache(model, r["loops"], r["kv_sharing"])
            logits = [model(idx[:, p:p + 1], loops=r["loops"], cache=cache)[0] for p in range(idx.size(1))]
            yield name, torch.cat(logits, 1)[where], None
        elif "exit" in r:  # teacher-forced: every position decodes as generation would
            steps, cache = model.steps(r["loops"]), model.new_cache(r["loops"])
            logits, used = zip(*(decode_with_exit(model, idx[:, p:p + 1], steps, cache, r["exit"], min_loops=1)
                                 for p in range(idx.size(1))))
            yield name, torch.cat(logits, 1)[where], torch.stack(used, 1)


def batches(rows, batch_tokens):
    """Rows sorted longest first, packed into batches of at most batch_tokens padded tokens."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    batch = []
    for i in order:
        if batch and (len(batch) + 1) * len(rows[batch[0]][0]) > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def score_rows(model, rows, routes, device, autocast, batch_tokens):
    """For every row (tokens, start, end) and route: the mean loss over the span, whether
    greedy decoding gets every span token right, and the loops used there (exits). Only the
    span's positions go through the loss (a 10-shot prompt is mostly context)."""
    names = [n for n, _ in routes]
    loss = {n: torch.zeros(len(rows)) for n in names}
    exact = {n: torch.zeros(len(rows), dtype=torch.bool) for n in names}
    loops = {n: torch.zeros(len(rows)) for n in names}
    for batch in batches(rows, batch_tokens):
        idx = np.zeros((len(batch), len(rows[batch[0]][0])), dtype=np.int64)
        y = np.full(idx.shape, -1, dtype=np.int64)  # y[b, p]: the token position p predicts
        for b, i in enumerate(batch):
            tokens, start, end = rows[i]
            idx[b, :len(tokens)] = tokens
            y[b, start - 1:end - 1] = idx[b, start:end]
        idx, y = torch.from_numpy(idx).to(device), torch.from_numpy(y).to(device)
        span = y >= 0
        row = span.nonzero()[:, 0]  # the batch row of each span position
        n_span = span.sum(1).float()
        with autocast:
            for name, logits, used in route_logits(model, idx, routes, span):
                logits, target = logits.float(), y[span]
                ce = torch.zeros(len(batch), device=device).index_add_(0, row, F.cross_entropy(logits, target,
                                                                                               reduction="none"))
                wrong = torch.zeros(len(batch), device=device).index_add_(0, row, (logits.argmax(-1) != target).float())
                loss[name][batch] = (ce / n_span).cpu()
                exact[name][batch] = (wrong == 0).cpu()
                if used is not None:
                    loops[name][batch] = ((used * span).sum(1) / n_span).cpu()
    return loss, exact, loops


def eval_task(model, enc, task, items, routes, device, autocast, batch_tokens=16384, rank=0, world=1, reduce=None):
    """Accuracy of every route on a task (this process's share of the items when world > 1,
    summed over the processes by `reduce`). Returns {route: {"acc", "n", "centered"?, "mean_loops"?}}."""
    rows, n_rows = [], []  # every choice's row; rows per item
    mine = range(rank, len(items), world)
    for i in mine:
        pairs = render(items[i], task["kind"], fewshot_examples(items, i, task["shots"]), task["delimiter"])
        rows.extend(tokenize(enc, pairs, task["kind"], model.config.block_size))
        n_rows.append(len(pairs))
    loss, exact, loops = score_rows(model, rows, routes, device, autocast, batch_tokens)
    # rows -> (item, choice) cells of a table, so every item is decided at once
    n_rows = torch.tensor(n_rows, dtype=torch.long)
    item = torch.repeat_interleave(torch.arange(len(n_rows)), n_rows)
    choice = torch.arange(len(rows)) - torch.repeat_interleave(n_rows.cumsum(0) - n_rows, n_rows)
    gold = torch.tensor([items[i].get("gold", 0) for i in mine], dtype=torch.long)
    results = {}
    for name, _ in routes:
        if task["kind"] == "language_modeling":  # one row per item: greedy decoding writes the continuation
            right = exact[name]
        else:  # the lowest mean loss wins (argmin takes the first of equals)
            table = torch.full((len(n_rows), max(n_rows.tolist(), default=1)), math.inf)
            table[item, choice] = loss[name]
            right = table.argmin(1) == gold
        item_loops = torch.zeros(len(n_rows), dtype=torch.float64).index_add_(0, item, loops[name].double()) / n_rows
        sums = torch.tensor([right.sum().item(), len(n_rows), item_loops.sum().item()], dtype=torch.float64)
        if reduce is not None:
            sums = reduce(sums.to(device)).cpu()
        acc = (sums[0] / sums[1]).item()
        results[name] = {"acc": acc, "n": int(sums[1])}
        if task.get("baseline") is not None:
            results[name]["centered"] = (acc - task["baseline"]) / (1 - task["baseline"])
        if dict(routes)[name].get("exit"):
            results[name]["mean_loops"] = (sums[2] / sums[1]).item()
    return results


def text_windows(n, block_size, stride):
    """Sliding windows over a text of n tokens: (begin, end, first) triples; window
    tokens[begin:end] is the input, and its predictions of tokens first..end are scored,
    so every token after the first is scored once, with at least block_size - stride
    tokens of context (all it has near the start)."""
    windows, first = [], 1
    while first < n:
        end = min(first - 1 + stride if first > 1 else block_size, n - 1)
        windows.append((max(0, end - block_size), end, first))
        first = end + 1
    return windows


def eval_text(model, tokens, token_bytes, routes, device, autocast, stride=0, batch_tokens=16384,
              rank=0, world=1, reduce=None):
    """Loss (nats/token) and perplexity over every target, and bits per byte over the
    targets that carry bytes (the document token has none), for every route."""
    bs = model.config.block_size
    windows = text_windows(len(tokens), bs, stride or max(1, bs // 2))[rank::world]
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    sums = {n: torch.zeros(5, dtype=torch.float64, device=device) for n, _ in routes}  # nats, tokens, bits, bytes, loops
    for at in range(0, len(windows), max(1, batch_tokens // bs)):
        chunk = windows[at:at + max(1, batch_tokens // bs)]
        idx = torch.zeros(len(chunk), bs, dtype=torch.long)
        y = torch.full((len(chunk), bs), -1, dtype=torch.long)
        for b, (begin, end, first) in enumerate(chunk):
            idx[b, :end - begin] = tokens[begin:end]
            y[b, first - 1 - begin:end - begin] = tokens[first:end + 1]
        idx, y = idx.to(device), y.to(device)
        scored = y >= 0  # (the context a window repeats is not scored again)
        nbytes = token_bytes[y[scored]]
        with autocast:
            for name, logits, used in route_logits(model, idx, routes, scored):
                ce = F.cross_entropy(logits.float(), y[scored], reduction="none")
                loops = used[scored].sum() if used is not None else ce.new_zeros(())
                sums[name] += torch.stack([ce.sum(), scored.sum(), (ce * (nbytes > 0)).sum() / math.log(2),
                                           nbytes.sum(), loops]).double()
    results = {}
    for name, s in sums.items():
        s = reduce(s) if reduce is not None else s
        loss = (s[0] / s[1]).item()
        results[name] = {"loss": loss, "ppl": math.exp(loss), "bpb": (s[2] / s[3]).item(), "tokens": int(s[1])}
        if dict(routes)[name].get("exit"):
            results[name]["mean_loops"] = (s[4] / s[1]).item()
    return results


# the lens's per-loop measurements: (key, what it is), in the table's and the plot's order
LENS_KEYS = (("changed", "predictions changed since loop t-1"), ("kl", "KL(p_t || p_M), nats"),
             ("move", "||x_t - x_(t-1)|| / ||x_t||"), ("kl_L", "KL(p_t || p_L), nats, t > L"),
             ("move_L", "||x_t - x_L|| / ||x_t||, t > L"))
LENS_ROWS = {"changed": "lens changed %", "kl": "lens KL to last", "move": "lens move", "kl_L": "lens KL to L",
             "move_L": "lens move from L"}  # (the table's row labels)


def eval_lens(model, tokens, routes, device, autocast, stride=0, batch_tokens=16384, rank=0, world=1, reduce=None):
    """
    The lens (sample.py's lens) over the held-out text, batched as eval_text scores it (every
    token once): ONE forward to the largest budget M of the routes, every loop t read through
    the coda and head. Reported at each budget route M=t (other routes: nothing): the
    fraction of positions whose argmax differs from loop t-1's, the mean KL(p_t || p_M), the
    mean movement ||x_t - x_{t-1}|| / ||x_t||, and past the train budget L (t > L), the mean
    KL(p_t || p_L) and ||x_t - x_L|| / ||x_t||: does the state settle where it was trained
    to stop, or drift? Under LoopFormer's modulation, loop t of the M-step schedule.
    """
    budgets = [r["loops"] for _, r in routes if set(r) == {"loops"}]
    results = {name: {} for name, _ in routes}
    if not budgets:
        return results
    M, L = max(budgets), model.config.n_loops
    anchor = L if M > L else None
    bs = model.config.block_size
    windows = text_windows(len(tokens), bs, stride or max(1, bs // 2))[rank::world]
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    sums = torch.zeros(6, M, dtype=torch.float64, device=device)  # positions, changed, kl, move, kl_L, move_L
    for at in range(0, len(windows), max(1, batch_tokens // bs)):
        chunk = windows[at:at + max(1, batch_tokens // bs)]
        idx = torch.zeros(len(chunk), bs, dtype=torch.long)
        scored = torch.zeros(len(chunk), bs, dtype=torch.bool)  # the positions eval_text scores
        for b, (begin, end, first) in enumerate(chunk):
            idx[b, :end - begin] = tokens[begin:end]
            scored[b, first - 1 - begin:end - begin] = True
        idx, scored = idx.to(device), scored.to(device)
        with autocast:
            out = lens(model, idx, loops=M, anchor=anchor)
        token = out["token"]
        changed = torch.cat([torch.zeros_like(token[:1]), token[1:] != token[:-1]]).float()
        zero = torch.zeros_like(out["kl"])
        parts = [torch.ones_like(zero), changed, out["kl"], out["move"], out.get("kl_anchor", zero),
                 out.get("move_anchor", zero)]
        sums += torch.stack([(p * scored).sum(dim=(1, 2)) for p in parts]).double()
    sums = reduce(sums) if reduce is not None else sums
    mean = (sums[1:] / sums[0].clamp_min(1)).tolist()
    for name, r in routes:
        if set(r) == {"loops"}:
            t = r["loops"] - 1
            res = {"changed": mean[0][t] if t else None, "kl": mean[1][t], "move": mean[2][t],
                   "positions": int(sums[0, t]), "lens_budget": M}
            if anchor is not None and t + 1 > L:
                res.update(kl_L=mean[3][t], move_L=mean[4][t])
            results[name] = res
    return results


def lens_line(res, routes, L):
    """The lens in one readable line: how fast predictions stop changing, and past L, settle or drift."""
    line = [(r["loops"], res[n]) for n, r in routes if set(r) == {"loops"}]
    if not line:
        return "lens: no budget among the routes (it reads loop t at the route M=t)"
    M = max(t for t, _ in line)
    changed = [(t, v["changed"]) for t, v in line if v.get("changed") is not None]
    text = f"lens (loop t of one M={M} forward, {line[0][1]['positions']} positions)"
    if changed:
        text += (f": predictions changed at t={changed[0][0]}: {100 * changed[0][1]:.1f}%, t={changed[-1][0]}: "
                 f"{100 * changed[-1][1]:.1f}%")
    at_L = next((v for t, v in line if t == L), None)
    if at_L is not None and M > L:
        text += f"; at t=L={L}: KL to the last loop {small(at_L['kl'])}, move {small(at_L['move'])}"
    past = [v for t, v in line if t > L and "kl_L" in v]
    if past:
        text += (f"; past L (t={L + 1}..{M}): move {small(min(v['move'] for v in past))} to "
                 f"{small(max(v['move'] for v in past))}, KL to loop L up to {small(max(v['kl_L'] for v in past))}, "
                 f"state up to {small(max(v['move_L'] for v in past))} "
                 f"of its norm from loop L's")
    return text


def text_tokens(task, enc, meta, data_dir, max_tokens):
    """The token stream of a text task: the checkpoint's own val split (in the dtype its
    dataset's meta, saved in the checkpoint, records: uint16 when none), or WikiText-2's test
    text; for a task dataset's val split its rows (inputs, targets, groups: eval_rows)."""
    if task["label"] in ("bpb", LENS):
        path = os.path.join(meta.get("data_dir") or os.path.join(ROOT, "data", meta.get("dataset", "")), "val.bin")
        if not os.path.isfile(path):
            fail(f"{task['label']}: no {path} (the checkpoint's val split); prepare its dataset first "
                 f"(python data/<dataset>/prepare.py), or choose other --tasks")
        if meta.get("format") == "task" and task["label"] == LENS:
            fail("lens: it reads a text dataset's val split; this checkpoint was trained on task rows (data/tasks)")
        if meta.get("format") == "task":  # rows of prompt + answer (data/tasks): the answers are scored
            rows = task_rows(os.path.dirname(path), meta["row_len"], meta=meta)
            return tuple(t[:max(1, max_tokens // meta["row_len"])] for t in rows) if max_tokens else rows
        tokens = np.fromfile(path, dtype=token_dtype(meta))
    else:  # as the FLT code reads it: every line of the test file on its own, after a document token
        path = os.path.join(data_dir, "wikitext-2", "wiki.test.tokens")
        if not os.path.isfile(path):
            fail(f"wikitext2: no {path}: download it on a machine with a network with: {PREPARE}")
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line if line.strip() else "" for line in f]
        except UnicodeDecodeError as e:
            fail(f"wikitext2: {path} is not UTF-8 text ({e}); delete it and run: {PREPARE}")
        tokens = np.array([t for ids in enc.encode_ordinary_batch(lines) for t in [enc.eot_token] + ids], dtype=np.int64)
    return tokens[:max_tokens] if max_tokens else tokens


# ---- task rows and the budget sweep: loss against M, its saturation, every schedule -------------

@torch.no_grad()
def score_batches(model, batches, routes, autocast, token_bytes, groups=None, reduce=None):
    """Every route over batches (x, y, group): loss (nats/token) and bits per byte over the
    positions that have a target (y >= 0: a task row scores its answer only), the mean loops
    of an exit there, and with `groups` (a task's group ids) exact match overall and per
    group: a row is right when the argmax is right at every scored position, which is
    exactly when greedy decoding writes its answer."""
    sums, right = {}, {}  # per route: nats, tokens, bits, bytes, loops; rows right and rows per group id
    for x, y, group in batches:
        scored = y >= 0
        row = scored.nonzero()[:, 0]  # the batch row of each scored position
        target = y[scored]
        nbytes = token_bytes[target]  # special tokens have no bytes and count in neither bits nor bytes
        with autocast:
            for name, logits, used in route_logits(model, x, routes, scored):
                ce = F.cross_entropy(logits.float(), target, reduction="none")
                loops = used[scored].sum() if used is not None else ce.new_zeros(())
                s = torch.stack([ce.sum(), scored.sum(), (ce * (nbytes > 0)).sum() / math.log(2), nbytes.sum(), loops])
                sums[name] = sums.get(name, 0) + s.double()
                if group is not None:
                    miss = (logits.argmax(-1) != target).float()
                    wrong = torch.zeros(len(x), device=x.device).index_add_(0, row, miss)  # per row
                    r = right.setdefault(name, torch.zeros(2, 256, device=x.device))
                    r[0].index_add_(0, group, (wrong == 0).float())
                    r[1].index_add_(0, group, torch.ones_like(wrong))
    results = {}
    for name, route in routes:
        s = sums.get(name, torch.zeros(5, dtype=torch.float64, device=token_bytes.device))
        s = reduce(s) if reduce is not None else s
        results[name] = {"loss": (s[0] / s[1]).item(), "bpb": (s[2] / s[3]).item()}
        if "exit" in route:
            results[name]["mean_loops"] = (s[4] / s[1]).item()
        if groups is not None:
            r = right.get(name, torch.zeros(2, 256, device=token_bytes.device))
            r = reduce(r) if reduce is not None else r
            results[name]["accuracy"] = {"acc": (r[0].sum() / r[1].sum()).item(),
                                         "by_group": {str(g): (r[0, g] / r[1, g]).item() for g in groups}}
    return results


def task_rows(folder, L, split="val", meta=None):
    """A task dataset's rows of L tokens (data/tasks: prompt + answer): inputs, targets (-1
    off the answer) and each row's group, as int64 tensors. The tokens are in the dtype the
    dataset's meta records (uint16 when none)."""
    def read(suffix, dtype):
        return np.fromfile(os.path.join(folder, f"{split}{suffix}.bin"), dtype=dtype)
    rows = read("", token_dtype(meta)).reshape(-1, L).astype(np.int64)
    mask = read("_mask", np.uint8).reshape(-1, L)
    y = np.where(mask[:, 1:] == 1, rows[:, 1:], -1)
    group = read("_group", np.uint8).astype(np.int64)
    return torch.from_numpy(rows[:, :-1]), torch.from_numpy(y), torch.from_numpy(group)


def eval_rows(model, rows, groups, token_bytes, routes, device, autocast, batch_tokens=16384, rank=0, world=1,
              reduce=None):
    """The `bpb` task of a task dataset: the answers of its val rows (x, y, group), with exact
    match per group (`groups`: the group ids)."""
    x, y, group = rows
    n = max(1, batch_tokens // x.size(1))
    mine = [slice(at, at + n) for at in range(rank * n, len(x), world * n)]
    batches = ((x[s].to(device), y[s].to(device), group[s].to(device)) for s in mine)
    return score_batches(model, batches, routes, autocast, token_bytes, groups, reduce)


def compositions(n, k):
    """Every way to write n as an ordered sum of k positive integers."""
    if k == 1:
        yield (n,)
        return
    for first in range(1, n - k + 2):
        for rest in compositions(n - first, k - 1):
            yield (first,) + rest


def grid_schedules(model, max_steps):
    """LoopFormer: every schedule of M = 2..min(max_steps, L - 1) steps on the 1/L grid (every
    composition of L into M parts, the LoopFormer paper's Figure 6) as routes; none for
    other models, whose steps are all the same."""
    L = model.config.n_loops
    if model.config.modulation != "loopformer":
        return []
    return [(f"sched {','.join(map(str, units))}", {"schedule": [u / L for u in units], "units": list(units)})
            for M in range(2, min(max_steps, L - 1) + 1) for units in compositions(L, M)]


def sweep_routes(model, exits=(), max_steps=0):
    """train.py's eval_only: every budget M = 1..2L (past the train depth: extrapolation; 1..L
    for MoR, which has a capacity for L recursions only), each exit [(name, (kind, x))] at
    L loops, and for LoopFormer every grid schedule of up to max_steps steps."""
    cfg = model.config
    L = cfg.n_loops
    budgets = range(1, (L if cfg.routing == "mor" else 2 * L) + 1)
    return ([(f"M={M}", {"loops": M}) for M in budgets] + [(name, {"exit": exit, "loops": L}) for name, exit in exits]
            + grid_schedules(model, max_steps))


def fit_saturation(Ms, losses):
    """Least-squares fit of loss(M) ≈ eps_inf + A exp(-k M) (Parcae): linear in (eps_inf, A)
    for a given k, so scan k on a log grid and keep the best."""
    Ms, losses = np.asarray(Ms, dtype=float), np.asarray(losses, dtype=float)
    best = None
    for k in np.logspace(-3, 1, 400):
        X = np.stack([np.ones_like(Ms), np.exp(-k * Ms)], axis=1)
        coef, *_ = np.linalg.lstsq(X, losses, rcond=None)
        err = float(((X @ coef - losses) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, k, coef, np.abs(X @ coef - losses).max())
    _, k, (eps_inf, A), max_res = best
    return {"eps_inf": float(eps_inf), "A": float(A), "k": float(k), "max_residual": float(max_res)}


def saturation(res, routes, L, what="loss"):
    """(fit, one line) of the loss over the budgets M = 1..L, or (None, None) where the
    routes do not hold every one of them or the results have no loss (accuracy tasks)."""
    loss = {r["loops"]: res[n].get("loss") for n, r in routes if set(r) == {"loops"} and isinstance(res[n], dict)}
    if L < 2 or any(loss.get(M) is None for M in range(1, L + 1)):
        return None, None
    fit = fit_saturation(range(1, L + 1), [loss[M] for M in range(1, L + 1)])
    return fit, (f"fit of {what} over M = 1..{L} (Parcae): ε(M) ≈ {fit['eps_inf']:.4f} + {fit['A']:.4f} "
                 f"e^(-{fit['k']:.3f} M)  (largest residual {fit['max_residual']:.4f})")


def schedule_table(res, routes, L):
    """({M: grid schedules best first}, a table of the best, worst and spread per M) by loss,
    against the uniform schedule (the budget M, where the routes have it)."""
    by_steps = {}
    for name, r in routes:
        if "units" in r and "loss" in res[name]:
            by_steps.setdefault(len(r["units"]), []).append((res[name]["loss"], r["units"]))
    record, rows = {}, []
    fmt = lambda lu: f"{lu[0]:.4f} ({','.join(map(str, lu[1]))})"  # noqa: E731
    for M, results in sorted(by_steps.items()):
        results.sort()
        record[str(M)] = [{"units": list(u), "loss": loss} for loss, u in results]
        uniform = res.get(f"M={M}", {}).get("loss")
        rows.append((M, len(results), f"{uniform:.4f}" if uniform is not None else "-", fmt(results[0]),
                     fmt(results[-1]), f"{results[-1][0] - results[0][0]:.4f}"))
    table = (f"every schedule of M steps on the 1/{L} grid (in units of 1/{L}), by loss:\n" +
             print_table(rows, ["M", "schedules", "uniform 1/M", "best", "worst", "spread"])) if rows else None
    return record, table


def budget_sweep(model, batches, routes, autocast, token_bytes, groups=None, group_name="group", reduce=None):
    """Loss at every budget of `routes` (a table, with exact match per group for task rows),
    the fit of its saturation over M <= L, loss against mean loops for every exit, and the
    best and worst grid schedule per M, over batches (x, y, group) as score_batches takes
    them. Returns (the text to print, the record: budgets, fit, exits, schedules)."""
    L = model.config.n_loops
    res = score_batches(model, batches, routes, autocast, token_bytes, groups, reduce)
    record, rows = {"budgets": {}, "schedules": {}}, []
    for name, r in routes:
        if set(r) == {"loops"}:
            M, b = r["loops"], res[name]
            record["budgets"][str(M)] = b
            acc = b.get("accuracy")  # task rows: exact match, overall then per group
            acc = (f"{100 * acc['acc']:.1f}",) + tuple(f"{100 * v:.0f}" for v in acc["by_group"].values()) if acc else ()
            rows.append((M, model.effective_depth(M), f"{b['loss']:.4f}", f"{b['bpb']:.4f}") + acc)
    lines = [print_table(rows, ["budget M", "depth", "val loss", "bpb"] +
                         (["exact %"] + [f"{group_name}={g}" for g in groups] if groups is not None else []))]
    record["fit"], fit_line = saturation(res, routes, L, "val loss")
    if fit_line:
        lines.append("\n" + fit_line)
    exits = [(name, r) for name, r in routes if "exit" in r]
    if exits:
        record["exits"] = {name: res[name] for name, _ in exits}
        full = res.get(f"M={L}")
        rows = ([("none (all loops)", f"{L:.2f}", f"{full['loss']:.4f}")] if full else []) + [
            (name, f"{res[name]['mean_loops']:.2f}", f"{res[name]['loss']:.4f}") for name, _ in exits]
        lines.append(f"\nper-token early exit, teacher-forced, at most {L} loops:\n" +
                     print_table(rows, ["exit", "mean loops", "val loss"]))
    record["schedules"], table = schedule_table(res, routes, L)
    if table:
        lines.append("\n" + table)
    return "\n".join(lines), record


def evaluate_tasks(model, enc, tasks, routes, device, autocast, meta, data_dir=EVAL_DATA, max_per_task=0,
                   max_text_tokens=0, stride=0, batch_tokens=16384, rank=0, world=1, reduce=None, progress=None):
    """{task label: {route: metrics}}, plus "CORE" {route: mean centered accuracy} when every
    CORE task is in `tasks`. max_per_task: N items of a task (0 = all)."""
    data = []  # every task's data first: a missing or broken file stops us before any compute
    for task in tasks:
        if task["kind"] in ("text", "lens"):
            data.append(text_tokens(task, enc, meta, data_dir, max_text_tokens))
        else:
            # nanochat's order: shuffled with seed 1337, then the first max_per_task; few-shot
            # examples are drawn from what is left
            items = load_items(task)
            random.Random(1337).shuffle(items)
            data.append(items[:max_per_task or None])
    was_training = model.training
    model.eval()
    token_bytes = torch.tensor(token_byte_lengths(enc), dtype=torch.float32, device=device)
    results = {}
    for task, task_data in (progress or (lambda x: x))(list(zip(tasks, data))):
        with torch.no_grad():
            if task["kind"] == "text" and meta.get("format") == "task" and task["label"] == "bpb":
                results["bpb"] = eval_rows(model, task_data, meta["val_groups"], token_bytes, routes, device, autocast,
                                           batch_tokens, rank, world, reduce)
            elif task["kind"] == "lens":
                results[LENS] = eval_lens(model, task_data, routes, device, autocast, stride, batch_tokens, rank, world,
                                          reduce)
            elif task["kind"] == "text":
                results[task["label"]] = eval_text(model, task_data, token_bytes, routes, device, autocast, stride,
                                                   batch_tokens, rank, world, reduce)
            else:
                results[task["label"]] = eval_task(model, enc, task, task_data, routes, device, autocast, batch_tokens,
                                                   rank, world, reduce)
    core = [t["label"] for t in tasks if t.get("core")]
    if core and data_dir and len(core) == len(core_table(data_dir)):
        results["CORE"] = {name: float(np.mean([results[t][name]["centered"] for t in core])) for name, _ in routes}
    model.train(was_training)
    return results


# ---- output: table and plots --------------------------------------------------------------

def result_table(results, routes):
    """Rows: tasks (accuracy %, CORE centered) and text tasks (bpb; perplexity for WikiText-2)."""
    names = [n for n, _ in routes]
    rows = []
    for label, res in results.items():
        if label == "CORE":
            continue
        if label == LENS:  # one row per measurement, "-" where a route has none
            for key, what in LENS_KEYS:
                if any(res[n].get(key) is not None for n in names):
                    rows.append([LENS_ROWS[key]] + [
                        "-" if res[n].get(key) is None else
                        f"{100 * res[n][key]:.1f}" if key == "changed" else small(res[n][key]) for n in names])
            continue
        if "bpb" in res[names[0]]:
            rows.append([("held-out" if label == "bpb" else label) + " bpb"] + [f"{res[n]['bpb']:.4f}" for n in names])
            if label == "wikitext2":
                rows.append([f"{label} ppl"] + [f"{res[n]['ppl']:.2f}" for n in names])
            if "accuracy" in res[names[0]]:  # a task dataset's answers: exact match
                rows.append(["  exact %"] + [f"{100 * res[n]['accuracy']['acc']:.1f}" for n in names])
        else:
            rows.append([f"{label} acc %"] + [f"{100 * res[n]['acc']:.1f}" for n in names])
        if any("mean_loops" in res[n] for n in names):
            rows.append(["  mean loops"] + [f"{res[n]['mean_loops']:.2f}" if "mean_loops" in res[n] else "" for n in names])
    if "CORE" in results:
        rows.append(["CORE (centered)"] + [f"{results['CORE'][n]:.4f}" for n in names])
    return print_table(rows, ["task"] + names)


def headline(res, key=None):
    """The number a plot shows for one task at one route: bpb, CORE, or accuracy; `key`, one
    of the lens's measurements (None where the route has none)."""
    if key is not None:
        return res.get(key) if isinstance(res, dict) else None
    return res if isinstance(res, float) else res.get("bpb", res.get("acc"))


def panels(label, res):
    """The plot panels of one task: [(title, y label, key)]: one, or one per lens measurement it has."""
    if label == LENS:
        return [(f"lens: {key}", what, key) for key, what in LENS_KEYS
                if any(headline(r, key) is not None for r in res.values())]
    metric = "bits per byte" if label in TEXT_TASKS else ("centered accuracy" if label == "CORE" else "accuracy")
    return [(label, metric, None)]


def pyplot():
    try:
        import matplotlib
    except ImportError:
        fail("plots need matplotlib: pip install matplotlib (or --plot=False)")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_metrics(record, path):
    """One panel per task: its metric against the loops run (budgets as a line; schedules
    and exits as labelled points at the loops they use)."""
    plt = pyplot()
    labels = [(label, *panel) for label, res in record["results"].items() for panel in panels(label, res)]
    cols = min(3, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (label, title, metric, key) in zip(axes.flat, labels):
        res = record["results"][label]
        line = [(r["loops"], headline(res[n], key)) for n, r in record["routes"] if set(r) == {"loops"}]
        line = [(x, y) for x, y in line if y is not None]
        if line:
            ax.plot(*zip(*line), "o-", label="loop t" if key else "budget M")
        for n, r in record["routes"]:
            if set(r) != {"loops"} and label != LENS:
                x = res[n].get("mean_loops", len(r.get("schedule", [])) or r.get("loops")) if isinstance(res[n], dict) else (
                    len(r.get("schedule", [])) or r.get("loops"))
                ax.plot([x], [headline(res[n])], "s")
                ax.annotate(n, (x, headline(res[n])), fontsize=7)
        ax.set(title=title, xlabel="loops", ylabel=metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle(record.get("title", ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_runs(run_dirs):
    """The table of --runs: each run's last training eval, read from its log.jsonl."""
    rows = []
    for run in run_dirs:
        log_path = os.path.join(run, "log.jsonl")
        if not os.path.exists(log_path) and not os.path.exists(os.path.join(run, "eval.jsonl")):
            fail(f"--runs: {run} has no log.jsonl or eval.jsonl: is it a train.py out_dir?")
        if not os.path.exists(log_path):  # evaluated, but trained elsewhere
            rows.append([os.path.basename(os.path.normpath(run)), "-", "-", "-", "(no log.jsonl)", ""])
            continue
        try:
            with open(log_path) as f:
                evals = [r for r in map(json.loads, f) if r.get("type") == "eval"]
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
            fail(f"--runs: cannot read {log_path} (is {run} a train.py out_dir?): {e}")
        if not evals:
            fail(f"--runs: {log_path} has no eval yet")
        last = evals[-1]
        rms = last.get("residual_rms", [])
        L = len(rms) or None  # the train budget: one residual-RMS entry per loop
        try:
            budgets = ", ".join(f"M={M}: {r['loss']:.3f}" for M, r in last["val"].items())
            at_L = last["val"].get(str(L), {}).get("loss")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            fail(f"--runs: {log_path}: its last eval has no val loss per budget (written by another version?): {e!r}")
        rows.append([os.path.basename(os.path.normpath(run)), last["step"], L, f"{at_L:.3f}" if at_L else "-",
                     budgets, " ".join(f"{r:.2f}" for r in rms)])
    return print_table(rows, ["run", "step", "L", "val@L", "val loss per budget M", "residual rms h_1..h_L"])


def budget_curve(record, metric, key=None):
    """([(M, value), ...], L) of `metric` (with `key`, that lens measurement) at the plain budgets
    of one eval.jsonl record, or None where it has fewer than two (another task, or a record
    another version of eval.py wrote)."""
    try:
        res = record["results"][metric]
        line = [(r["loops"], headline(res[n], key)) for n, r in record["routes"] if set(r) == {"loops"}]
        line = [(M, float(v)) for M, v in line if v is not None]
        return (line, int(record["n_loops"])) if len(line) > 1 else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def plot_runs(run_dirs, metric, path):
    """The lead plot: `metric` (a task label) against the budget M, one line per run, from
    the latest record of each run's eval.jsonl that has it at two budgets or more; for
    --metric=lens, a panel per lens measurement against the loop t."""
    plt = pyplot()
    keys = [(key, what) for key, what in LENS_KEYS] if metric == LENS else [(None, None)]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 if metric != LENS else 4.2 * len(keys), 4), squeeze=False)
    for ax, (key, what) in zip(axes.flat, keys):
        plot_runs_panel(ax, run_dirs, metric, key)
        if key:
            ax.set(xlabel="loop t (one forward to the largest budget)", ylabel=what, title=f"lens: {key}")
            if key != "changed":  # (they fall by orders of magnitude; the last loop's KL to itself, 0, is left out)
                ax.set_yscale("log")
            if key != "changed" and ax.get_legend():  # (one legend, in the first panel)
                ax.get_legend().remove()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_runs_panel(ax, run_dirs, metric, key=None):
    """One panel of plot_runs: `metric` (or its lens measurement `key`) for every run."""
    for run in run_dirs:
        log_path = os.path.join(run, "eval.jsonl")
        try:
            with open(log_path) as f:
                records = [json.loads(line) for line in f if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            fail(f"--runs: cannot read {log_path} (run eval.py --out_dir={run} first): {e}")
        curves = [c for c in map(lambda r: budget_curve(r, metric, key), records) if c]
        if not curves and key not in (None, "kl"):  # (a run with too few loops for this lens panel: past L, say)
            continue
        if not curves:
            fail(f"--runs: {log_path} has no '{metric}' at two budgets or more: run eval.py --out_dir={run} "
                 f"--tasks={metric}, or choose another --metric")
        line, L = curves[-1]
        if key not in (None, "changed"):
            line = [(x, y) for x, y in line if y > 0]
        ax.plot(*zip(*line), "o-", label=f"{os.path.basename(os.path.normpath(run))} (L={L})")
        ax.axvline(L, color=ax.lines[-1].get_color(), alpha=0.15)
    ax.set(xlabel="loop budget M at inference", ylabel="bits per byte" if metric in TEXT_TASKS else metric,
           title=f"{metric} against the loop budget (faint lines: the train budget L)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)


# ---- the command line ------------------------------------------------------------------------

def parse_routes(model, budgets, schedules, exits, kv_sharing=""):
    """Routes from --budgets / --schedule / --exit / --kv_sharing, checked against the model
    (one-line errors)."""
    cfg = model.config
    L = cfg.n_loops
    budgets = budgets or tuple(range(1, (L if cfg.routing == "mor" else 2 * L) + 1))
    routes = []
    for M in budgets:
        try:
            model.steps(M)
        except ValueError as e:
            fail(f"--budgets={','.join(map(str, budgets))}: {e}")
        routes.append((f"M={M}", {"loops": M}))
    for text in filter(None, schedules.split("/")):
        try:
            routes.append((f"sched {text}", {"schedule": parse_schedule(text, cfg)}))
        except ValueError as e:
            fail(f"--schedule={text}: {e}")
    for spec in filter(None, exits.split(",")):
        try:
            exit = parse_exit(spec, cfg)
        except ValueError as e:
            fail(f"--exit={spec}: {e}")
        routes.append((f"{spec}@{max(budgets)}", {"exit": exit, "loops": max(budgets)}))
    for spec in filter(None, kv_sharing.split(",")):
        try:
            new_cache(model, 1, spec)
        except ValueError as e:
            fail(f"--kv_sharing={spec}: {e}")
        routes += [(f"kv {spec} M={M}", {"kv_sharing": spec, "loops": M}) for M in budgets]
    return routes


def main():
    defaults = dict(
        out_dir="out",           # the checkpoint, and where eval.jsonl / eval.png go
        init_from="",            # hf:NAME: evaluate a released looped model (results in out_dir, default out-hf-OWNER--NAME)
        tasks="bpb",             # see the module docstring
        budgets=(),              # loop budgets M; () = 1..2L (1..L for MoR)
        schedule="",             # LoopFormer schedules in units of 1/L (or fractions), several separated by "/"
        exit="",                 # per-token exits kind:threshold, comma-separated, at the largest budget
        sweep_max_steps=0,       # LoopFormer: also every schedule of 2..N steps on the 1/L grid, best and worst per N
        kv_sharing="",           # K/V shared across loops, comma-separated (last,mean,first,window:N; none =
                                 # the exact cache): every budget scored by decoding one token at a time
        max_per_task=0,          # items per task, the first N (0 = all)
        max_text_tokens=0,       # tokens of a text task, the first N (0 = all)
        stride=0,                # text tasks: sliding-window stride (0 = block_size / 2)
        batch_tokens=16384,      # padded tokens per forward
        data_dir="",             # the downloads (default data/eval)
        device="",
        dtype="",                # bfloat16 (autocast) | float32; "" = bfloat16 on CUDA, float32 on CPU
        plot=True,               # OUT_DIR/eval.png
        runs="",                 # instead of evaluating: compare these out_dirs (a table, and a plot of --metric)
        metric="bpb",
        plot_file="budgets.png",
    )
    args, explicit = parse_args(sys.argv[1:], defaults, allow_config=False)
    if args["init_from"] and "out_dir" not in explicit:
        args["out_dir"] = "out-hf-" + args["init_from"].removeprefix("hf:").strip("/").replace("/", "--")
    if args["runs"]:  # comma-separated, each a folder or a quoted pattern: --runs='out-exp/*'
        runs = [r for item in args["runs"].split(",") if item
                for r in (sorted(glob.glob(item)) if glob.has_magic(item) else [item])]
        if not runs:
            fail(f"--runs={args['runs']}: no folder matches")
        print(compare_runs(runs))
        missing = [r for r in runs if not os.path.exists(os.path.join(r, "eval.jsonl"))]
        if missing:
            print(f"no plot: {missing[0]} has no eval.jsonl yet (python eval.py --out_dir={missing[0]})")
            return
        make_dir(os.path.dirname(os.path.abspath(args["plot_file"])), "plot_file's folder")
        plot_runs(runs, args["metric"], args["plot_file"])
        print(f"wrote {args['plot_file']}")
        return
    for key in ("max_per_task", "max_text_tokens", "stride", "sweep_max_steps"):
        if args[key] < 0:
            fail(f"--{key} must be >= 0")
    if args["batch_tokens"] < 1:
        fail("--batch_tokens must be >= 1")
    data_dir = args["data_dir"] or EVAL_DATA

    ddp = int(os.environ.get("RANK", -1)) != -1
    device = detect_device(args["device"])
    rank, world, reduce = 0, 1, None
    if ddp:
        import torch.distributed as dist
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        # device_id binds NCCL to this rank's GPU (without it, barrier() guesses and warns)
        cuda = device.startswith("cuda")
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)

        def reduce(t):
            dist.all_reduce(t)
            return t
    autocast, dtype = autocast_context(device, args["dtype"])

    model, enc, what = open_model(args["out_dir"], args["init_from"])
    model.to(device)
    meta = dict(what["data_meta"])
    tc = what["train_config"]
    if args["init_from"]:
        for own in ("bpb", LENS):
            if own in [t.strip() for t in args["tasks"].split(",")]:
                fail(f"--tasks={own} reads a checkpoint's own held-out data; {args['init_from']} has none here: "
                     f"use --tasks=core, wikitext2 or a task by name (and sample.py --lens for a prompt)")
        make_dir(args["out_dir"], "out_dir")
    else:
        meta["data_dir"] = tc.get("data_dir") or os.path.join(ROOT, "data", tc.get("dataset", "pydoc"))
    if args["stride"] > model.config.block_size:
        fail(f"--stride={args['stride']}: a window moves by at most its length, block_size={model.config.block_size}")
    routes = parse_routes(model, args["budgets"], args["schedule"], args["exit"], args["kv_sharing"])
    grid = grid_schedules(model, args["sweep_max_steps"])  # (too many for the table's columns: a table of their own)
    deepest = max(len(r.get("schedule", ())) or r["loops"] for _, r in routes)
    try:  # one pass keeps every loop's state of a batch (and an exit route its KV cache)
        check_fits(deepest * args["batch_tokens"] * model.config.n_embd * 4, f"--budgets up to {deepest} "
                   f"(every loop's state for --batch_tokens={args['batch_tokens']})", device)
        if LENS in [t.strip() for t in args["tasks"].split(",")]:  # + four (B, T, V) float32 log-probabilities
            check_fits(deepest * args["batch_tokens"] * model.config.n_embd * 4 + 16 * args["batch_tokens"] *
                       model.config.vocab_size, f"--tasks=lens up to {deepest} loops (the states and four "
                       f"log-probabilities of --batch_tokens={args['batch_tokens']})", device)
        if args["exit"]:
            check_fits(kv_cache_bytes(model, max(1, args["batch_tokens"] // model.config.block_size), deepest),
                       f"--exit at {deepest} loops (the KV cache of a batch)", device)
    except ValueError as e:
        fail(f"{e}; choose smaller budgets or --batch_tokens")
    tasks = resolve_tasks(args["tasks"], data_dir, allow_lens=True)
    master = rank == 0
    if master:
        trained = "" if what["iter_num"] is None else f", trained {what['iter_num']} steps"
        print(f"{what['source']}: {summary(model)}{trained} | {device}, {dtype} | {len(tasks)} tasks x {len(routes)} routes")
    t0 = time.time()
    from tqdm import tqdm
    results = evaluate_tasks(model, enc, tasks, routes + grid, device, autocast, meta, data_dir, args["max_per_task"],
                             args["max_text_tokens"], args["stride"], args["batch_tokens"], rank, world, reduce,
                             progress=lambda ts: tqdm(ts, desc="tasks", disable=not master))
    seconds = time.time() - t0
    if master:
        L, sweep = model.config.n_loops, {}
        print(result_table(results, routes))
        if LENS in results:
            print(lens_line(results[LENS], routes, L))
        for label, res in results.items():  # the saturation over M = 1..L, and the grid's schedules
            if label not in ("CORE", LENS):
                fit, line = saturation(res, routes, L, f"{label} loss")
                schedules, table = schedule_table(res, routes + grid, L)
                sweep[label] = {"fit": fit, "schedules": schedules}
                if line or table:
                    print("\n".join(filter(None, [line, table])))
            for name, _ in grid:  # (kept in the sweep, out of the table's columns)
                del res[name]
        print(f"({seconds:.0f} s)")
        record = {"type": "eval", "step": what["iter_num"], "n_loops": model.config.n_loops, "tasks": args["tasks"],
                  "max_per_task": args["max_per_task"], "seconds": seconds, "device": device, "dtype": dtype,
                  "routes": [[n, {k: list(v) if isinstance(v, tuple) else v for k, v in r.items()}] for n, r in routes],
                  "results": results, "sweep": sweep,
                  "title": f"{what['source']} (L={model.config.n_loops}" +
                           ("" if what["iter_num"] is None else f", step {what['iter_num']}") + ")"}
        with open(os.path.join(args["out_dir"], "eval.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if args["plot"]:
            plot_metrics(record, os.path.join(args["out_dir"], "eval.png"))
        print(f"appended to {args['out_dir']}/eval.jsonl" + (f"; plot {args['out_dir']}/eval.png" if args["plot"] else ""))
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
