"""
Generate text from a trained LoopGPT at several loop budgets, side by side; and the decoding
engine that eval.py, bench.py and the tests import (as gpt-fast's generate.py and nanochat's engine.py).

    python sample.py                              # the model in out/, at its train budget
    python sample.py --budgets=1,2,4,8            # same prompt and seed at four budgets
    python sample.py --start="def " --max_new_tokens=100 --temperature=0.7
    python sample.py --start=FILE:prompt.txt --num_samples=3
    python sample.py --schedule=3,2,2,1           # LoopFormer: 4 steps of 3/8, 2/8, 2/8, 1/8
    python sample.py --budgets=2,8 --schedule=3,2,2,1/0.5,0.5   # several, side by side
    python sample.py --budgets=16 --exit=kl:1e-3  # per-token early exit (also latent:0.03, gate:0.9)
    python sample.py --budgets=4,16 --kv_sharing=last   # K/V memory constant in the budget (also mean, first, window:N)
    python sample.py --lens=True --budgets=8 --start="The for statement"   # what each loop would predict (+ lens.png)

Every budget restarts the random generator from the same seed, so the differences
between budgets come from the loops alone.

The engine (the model file keeps the exact cache and a plain generate):
- SharedKVCache: the core's K/V slots shared across loops (kv_sharing), memory constant in M.
- StaticKVCache and graph_decode_step: a decoding step captured once as a CUDA graph, replayed.
- decode_with_exit: per-token early exit (Huginn's KL and latent criteria, Ouro's gate,
  LoopUS's confidence head).
- lens: what the model would predict at every position had it stopped after each loop, from
  one forward (sample.py --lens, eval.py's lens task).
- generate(model, ...): all of the above behind one call.
"""

import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from configs import (autocast_context, check_exit, detect_device, fail, make_dir, parse_args, parse_exit,
                     parse_kv_sharing, parse_schedule, print_table)
from loopgpt import (KVCache, MoRCache, check_fits, confidence_logit, exit_probability, load_checkpoint,
                     model_from_checkpoint, norm, sample_next, selective_update, summary)
from data.tokenizer import load_tokenizer


# ---- KV sharing across loops -------------------------------------------------------------------

class SharedKVCache(KVCache):
    """
    A KV cache whose core slots are shared across loops, trading exactness for memory that
    does not grow with the budget. Core layer j at loop t uses
      last      one slot per core layer, rewritten every loop: a past token's entry is its
                last loop's K/V (Ouro's decode-time sharing, Zhu et al. 2025, Table 14)
      mean      one slot per core layer: a past token's entry is the mean of its loops' K/V
                (Ouro's other option); within a forward each loop still sees its own
      first     one slot per core layer, written at loop 1 only: every later loop reads
                loop 1's K/V, the current tokens' included (Mixture-of-Recursions' recursive
                KV sharing, Bae et al. 2025; prefill shares too, as MoR trains)
      window:N  N slots per core layer, loop t in slot t mod N (Huginn's compressed cache,
                Geiping et al. 2025: a past token's entry is its last loop ≡ t mod N)
    ('none' is the exact KVCache.) With last, mean and window, a prefill is still exact
    (every token of the chunk writes its loop-t K/V before loop t's attention reads them);
    tokens decoded later see past tokens' shared entries instead of their loop-t ones.
    """

    def __init__(self, cfg, loops, kind, N):
        self.P, self.K, self.M, self.kind, self.N = cfg.n_prelude, cfg.n_core, loops, kind, N
        super().__init__(cfg.n_prelude + cfg.n_core * self.core_groups() + cfg.n_coda, cfg.block_size)
        self.mean_sum = None  # mean: the running sum of the current tokens' K/V per core layer

    def core_groups(self):
        """How many K-slot groups the core keeps: min(N, M) for a window, 1 else."""
        return min(self.N, self.M) if self.kind == "window" else 1

    def physical(self, slot):
        """(slot in the buffers, loop t or None outside the core) of the visit `slot`."""
        P, K, M = self.P, self.K, self.M
        if slot < P:
            return slot, None
        if slot >= P + K * M:  # the coda, after the core's shared slots
            return slot - K * M + K * self.core_groups(), None
        t, j = divmod(slot - P, K)
        return P + K * (t % self.N if self.kind == "window" else 0) + j, t

    def store(self, slot, k, v):
        if self.k is None:
            self.allocate(k)
        p, t = self.physical(slot)
        end = self.pos + k.size(2)
        if self.kind == "first" and t is not None and t > 0:  # loop 1's K/V serve every later loop
            return self.k[p, :, :, :end], self.v[p, :, :, :end]
        if self.kind == "mean" and t is not None:
            if self.mean_sum is None:
                self.mean_sum = [None] * self.K
            ks, vs, n = self.mean_sum[p - self.P] or (0.0, 0.0, 0)
            self.mean_sum[p - self.P] = (ks + k.float(), vs + v.float(), n + 1)
        return super().store(p, k, v)

    def advance(self, T):
        """mean writes the new tokens' mean K/V over their loops, then the position moves."""
        if self.mean_sum is not None:
            end = self.pos + T
            for j, (ks, vs, n) in enumerate(self.mean_sum):
                self.k[self.P + j, :, :, self.pos:end] = ks / n
                self.v[self.P + j, :, :, self.pos:end] = vs / n
            self.mean_sum = None
        super().advance(T)


def new_cache(model, loops, kv_sharing="none"):
    """An empty KV cache for budget `loops`: the model's exact one, or with kv_sharing (see
    SharedKVCache) the core's slots shared across loops, memory that does not grow with the
    budget at the price of exactness. A melt=True model's own cache is shared by construction."""
    cfg = model.config
    kind, N = parse_kv_sharing(kv_sharing)
    if cfg.melt and kind not in ("none", "last"):
        raise ValueError(f"kv_sharing={kv_sharing}: a melt=True model has its own shared cache")
    if kind == "none" or cfg.melt:
        return model.new_cache(loops)
    if cfg.routing == "mor":
        raise ValueError("kv_sharing with routing='mor': MoR's cache keeps its own per-recursion selections")
    return SharedKVCache(cfg, loops, kind, N)


def kv_cache_bytes(model, batch, loops, dtype=torch.float32, kv_sharing="none"):
    """What new_cache(model, loops, kv_sharing) will hold for `batch` rows: K and V at every
    slot (without sharing one per layer visit, the effective depth)."""
    cfg = model.config
    kind, N = ("last", 0) if cfg.melt else parse_kv_sharing(kv_sharing)  # (MELT's cache is always shared)
    groups = loops if kind == "none" else min(N, loops) if kind == "window" else 1
    slots = cfg.n_prelude + cfg.n_core * groups + cfg.n_coda
    return 2 * slots * batch * cfg.n_kv_head * cfg.block_size * (cfg.n_embd // cfg.n_head) * dtype.itemsize


# ---- static decoding and CUDA graphs -----------------------------------------------------------

class StaticKVCache(KVCache):
    """The exact cache, which after the prompt can switch to static decoding (graph_decode_step):
    the position lives in a device tensor, each token is written at it and attends to the whole
    buffer under a mask, so a step's shapes never change."""

    def __init__(self, n_slots, max_len):
        super().__init__(n_slots, max_len)
        self.pos_t = None  # static decoding: the position as a (1,) device tensor
        self.masks = {}  # this step's key mask per attention window, shared by the layers

    def rows(self, table, T):
        return super().rows(table, T) if self.pos_t is None else table.index_select(0, self.pos_t)

    def update(self, slot, k, v, window=0):
        if self.pos_t is None:
            return super().update(slot, k, v, window)
        if self.k is None:
            self.allocate(k)
        self.k[slot].index_copy_(2, self.pos_t, k.to(self.k.dtype))
        self.v[slot].index_copy_(2, self.pos_t, v.to(self.v.dtype))
        if window not in self.masks:  # which of the max_len keys the token at pos_t sees
            k_pos = torch.arange(self.max_len, device=self.pos_t.device)
            mask = k_pos <= self.pos_t
            self.masks[window] = (mask & (self.pos_t - k_pos < window) if window else mask).view(1, 1, 1, -1)
        return self.k[slot], self.v[slot], self.masks[window]

    def advance(self, T):
        self.masks = {}  # the next step's position has other masks
        super().advance(T)


def graph_decode_step(model, steps, cache, idx):
    """
    One decoding step (B, 1 tokens through every (loop, layer) of the schedule into the
    cache) captured as a CUDA graph; returns replay(idx) -> logits (B, 1, V). A looped
    model's step is the same few kernels over and over (72 block visits at M = 12 on 6
    layers), each too small to keep a GPU busy: launched one by one from Python, the
    launches are the time. Capture needs shapes that do not change, so the cache (a
    StaticKVCache) switches to static decoding. The same arithmetic as the eager step
    (tested on the CPU, where the static cache runs without a graph).
    """
    device, pos = idx.device, cache.pos
    static_idx = idx.clone()
    cache.pos_t = torch.tensor([pos], device=device)
    # autocast's weight-cast cache must stay off while capturing: a cast cached before
    # the capture would be freed after it while the graph still reads it
    dtype, enabled = torch.get_autocast_dtype("cuda"), torch.is_autocast_enabled("cuda")

    def autocast():
        return torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), autocast():  # warm-up off the graph (library handles, workspaces)
        for _ in range(2):
            model(static_idx, schedule=steps, cache=cache)  # writes this token's K/V at pos: harmless
            cache.pos = pos
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), autocast():
        static_logits, _ = model(static_idx, schedule=steps, cache=cache)
    cache.pos = pos

    def replay(idx):
        static_idx.copy_(idx)
        cache.pos_t.fill_(cache.pos)
        graph.replay()
        cache.advance(1)
        return static_logits.clone()
    return replay


# ---- per-token early exit ----------------------------------------------------------------------

def decode_with_exit(model, idx, steps, cache, exit, min_loops=1):
    """
    One new token (B, 1) through the model, each row stopping after the first loop whose
    exit criterion fires (no row before min_loops):
      ("kl", ε)        KL(p_{t-1} || p_t) of the next-token distributions < ε (Huginn; p_0 uniform)
      ("latent", ε)    ||h_t - h_{t-1}|| / ||h_t|| < ε (Huginn)
      ("gate", q)      Ouro's gate: stop once the exit CDF Σ p_t reaches q
      ("gate_all", q)  the same choice as Ouro's released code makes it: every loop runs
                       (no compute saved, every K/V real), the exit picks the state for the head
      ("confidence", q) LoopUS's confidence head: σ(q_t) > q
    A row that stopped keeps its state, and the K/V of the loops it skipped are filled from
    its last computed loop for the same layer (Huginn's latest-m4), so later tokens attending
    to it find an entry in every (loop, layer) slot. Returns (logits (B, 1, V), loops used per row).
    """
    cfg, kind, threshold = model.config, exit[0], exit[1]
    B, pos, M = idx.size(0), cache.pos, len(steps)
    rope = (cache.rows(model.rope_cos, 1), cache.rows(model.rope_sin, 1))
    e, h = model.loop_input(idx, rope, cache)
    x = h  # the latent exit compares loop 1 with h_0 (Huginn code)
    first, coda_slot = cfg.n_prelude, cfg.n_prelude + cfg.n_core * M
    used = torch.full((B,), M, device=idx.device)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    logp_prev = torch.full((B, cfg.vocab_size), -math.log(cfg.vocab_size), device=idx.device)  # p_0 uniform
    continue_prob = torch.ones(B, device=idx.device)  # gate: Π_{j<t} (1 - λ_j)
    for i, dt in enumerate(steps):
        x_new = model.core_pass(h, e, i, rope, cache, first + i * cfg.n_core,
                                model.conditioning(i, math.fsum(steps[:i]), dt))
        update = x_new - x
        x_new = selective_update(model, x_new, x)
        if done.any() and kind != "gate_all":
            x_new = torch.where(done.view(-1, 1, 1), x, x_new)
            rows = done.nonzero().flatten()
            src = first + (used[rows] - 1) * cfg.n_core  # each stopped row's last computed loop
            for j in range(cfg.n_core):
                cache.k[first + i * cfg.n_core + j, rows, :, pos] = cache.k[src + j, rows, :, pos]
                cache.v[first + i * cfg.n_core + j, rows, :, pos] = cache.v[src + j, rows, :, pos]
        x_prev, x = x, x_new
        h = model.next_state(x)
        if i == M - 1:
            break
        if kind == "kl":  # the next-token distribution after this loop, through coda and head
            logp = F.log_softmax(model.logits(model.norm_f(model.run_coda(x, rope, cache, coda_slot)))[:, -1], dim=-1)
            kl = (logp_prev.exp() * (logp_prev - logp)).sum(-1)  # KL(p_{t-1} || p_t)
            logp_prev = logp
            fire = kl < threshold
        elif kind == "latent":
            fire = ((x - x_prev).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12))[:, -1] < threshold
        elif kind == "confidence":  # LoopUS: the head is sure enough this loop's prediction is right
            fire = torch.sigmoid(confidence_logit(model, update))[:, -1] > threshold
        else:  # gate, gate_all: p_t = λ_t Π_{j<t}(1 - λ_j); stop once Σ p_t >= q
            lam = exit_probability(model, x)[:, -1, 0]
            continue_prob = continue_prob * (1 - lam)
            fire = 1 - continue_prob >= threshold
        newly = fire & ~done & (i + 1 >= min_loops)
        used = torch.where(newly, torch.full_like(used, i + 1), used)
        done = done | newly
        x_exit = torch.where(newly.view(-1, 1, 1), x, x if i == 0 else x_exit)  # gate_all: the chosen state
    if kind == "gate_all" and M > 1:
        x = torch.where(done.view(-1, 1, 1), x_exit, x)
    x = model.run_coda(x, rope, cache, coda_slot)  # every row's final state: the real coda K/V
    cache.advance(1)
    return model.logits(model.norm_f(x)), used


# ---- the lens: what each loop would predict ----------------------------------------------------

def kl_div(logp, logq):
    """KL(p || q) = Σ_v p(v) (log p(v) - log q(v)) over the last dimension, from log-probabilities
    (>= 0; rounding can leave -1e-9, clamped)."""
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)


@torch.no_grad()
def lens(model, idx, loops=None, schedule=None, exit=None, min_loops=1, anchor=None):
    """
    What the model would predict at every position if it stopped after loop t, for every
    t = 1..M, read off ONE forward at budget M (or `schedule`): each loop's recorded state x_t
    goes through the coda, the final norm and the head, as LoopGPT.logits_at_budgets reads a
    smaller budget (for models whose loop t does not depend on M, exactly the model run at
    budget t; under LoopFormer's modulation, loop t of this M-step schedule). Returns a dict:
      token    (M, B, T)  argmax of p_t, the next token had the model stopped at loop t
      prob     (M, B, T)  p_t(token_t)
      final    (M, B, T)  p_t(token_M): how much loop t already believes the last loop's answer
      kl       (M, B, T)  KL(p_t || p_M), 0 at t = M
      kl_prev  (M, B, T)  KL(p_{t-1} || p_t), p_0 uniform (what Huginn's KL exit reads)
      move     (M, B, T)  ||x_t - x_{t-1}|| / ||x_t||, x_0 = h_0 (Huginn's latent exit reads it)
    where the model has them: lam (exit_gate: Ouro's λ_t), conf (confidence_head: LoopUS's
    σ(q_t)), depth (B, T) (routing='mor': the recursions each token got); with anchor = L,
    kl_anchor KL(p_t || p_L) and move_anchor ||x_t - x_L|| / ||x_t|| (does the state settle
    or drift past the train budget?); with exit = (kind, threshold), exit (B, T): the loop
    at which decode_with_exit's rule would stop each token, the earlier tokens having run
    all M loops (as generate runs a prompt): exactly decoding's choice for the latent, gate
    and confidence exits; the KL exit reads p_t, whose coda here sees the earlier positions
    at loop t too, where decoding's coda sees them at loop M (the same without a coda).
    Only the states (which the forward keeps anyway) and four (B, T, V) log-probabilities
    at a time are held, never M of them.
    """
    cfg = model.config
    if model.training:  # (a random initial state is drawn afresh in training: h_0 would not be the forward's)
        raise ValueError("the lens reads a model in eval mode: call model.eval() first")
    if idx.dim() != 2 or idx.size(1) < 1:
        raise ValueError(f"the lens reads a batch of token ids (B, T), T >= 1; got shape {tuple(idx.shape)}")
    if idx.size(1) > cfg.block_size:
        raise ValueError(f"a prompt of {idx.size(1)} tokens exceeds block_size={cfg.block_size}")
    steps = model.steps(loops, schedule)
    M = len(steps)
    if exit is not None:
        check_exit(exit, cfg)
    if anchor is not None and not 1 <= anchor <= M:
        raise ValueError(f"anchor loop {anchor} is not among the loops 1..{M}")
    record = {}
    h_last = model.trunk(idx, steps, record=record)
    T = idx.size(1)
    _, x_prev = model.loop_input(idx, (model.rope_cos[:T], model.rope_sin[:T]), None)  # h_0
    states = record["states"]  # (MoR stops once no token is left in the loop: later loops keep the last state)

    def log_probs(h):  # the head on a state after the coda, as logits_at_budgets reads it
        return F.log_softmax(model.logits(model.norm_f(h)).float(), dim=-1)

    # KL(p_t || p_M), the expectation under loop t's distribution: "how much is lost by
    # predicting with the last loop's distribution instead of loop t's", the same order as
    # Huginn's exit KL(p_{t-1} || p_t) (earlier loop first), and finite since p_M > 0 everywhere
    logp_last = log_probs(h_last)
    top_last = logp_last.argmax(-1, keepdim=True)
    logp_anchor = x_anchor = None
    if anchor is not None:
        x_anchor = states[min(anchor, len(states)) - 1]
        logp_anchor = logp_last if anchor == M else log_probs(model.run_coda(x_anchor))
    logp_prev = torch.full_like(logp_last, -math.log(cfg.vocab_size))  # p_0 uniform (Huginn)
    out = {}
    used = torch.full(idx.shape, M, device=idx.device)
    done = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
    continue_prob = torch.ones(idx.shape, device=idx.device)  # gate: Π_{j<t} (1 - λ_j)
    for t in range(M):
        x = states[min(t, len(states) - 1)]
        logp = logp_last if t == M - 1 else log_probs(model.run_coda(x))
        token = logp.argmax(-1, keepdim=True)
        row = {"token": token[..., 0], "prob": logp.gather(-1, token)[..., 0].exp(),
               "final": logp.gather(-1, top_last)[..., 0].exp(), "kl": kl_div(logp, logp_last),
               "kl_prev": kl_div(logp_prev, logp),
               "move": (x - x_prev).float().norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-12)}
        if cfg.exit_gate:
            row["lam"] = exit_probability(model, x)[..., 0].float()
        if cfg.confidence_head:  # on the loop's update f(h) - x, before the gate (record["updates"])
            row["conf"] = torch.sigmoid(confidence_logit(model, record["updates"][min(t, len(states) - 1)])).float()
        if anchor is not None:
            row["kl_anchor"] = kl_div(logp, logp_anchor)
            row["move_anchor"] = (x - x_anchor).float().norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-12)
        if exit is not None and t < M - 1:  # decode_with_exit's rules, every position at once
            kind, threshold = exit
            if kind == "kl":
                fire = row["kl_prev"] < threshold
            elif kind == "latent":
                fire = row["move"] < threshold
            elif kind == "confidence":
                fire = row["conf"] > threshold
            else:  # gate, gate_all: stop once the exit CDF 1 - Π_{j<=t} (1 - λ_j) reaches q
                continue_prob = continue_prob * (1 - row["lam"])
                fire = 1 - continue_prob >= threshold
            newly = fire & ~done & (t + 1 >= min_loops)
            used = torch.where(newly, t + 1, used)
            done = done | newly
        for key, value in row.items():
            out.setdefault(key, []).append(value)
        logp_prev, x_prev = logp, x
    out = {key: torch.stack(values) for key, values in out.items()}
    if cfg.routing == "mor":  # a token's depth: the recursions that kept it
        out["depth"] = torch.stack([sel for _, _, sel in record["routes"]]).sum(0)
    if exit is not None:
        out["exit"] = used
    return out


# ---- generate ------------------------------------------------------------------------------------

@torch.inference_mode()  # no autograd bookkeeping at all: measurably faster than no_grad
def generate(model, idx, max_new_tokens, loops=None, schedule=None, temperature=1.0, top_k=None,
             use_cache=True, generator=None, exit=None, min_loops=1, loops_used=None, cuda_graph=True,
             kv_sharing="none"):
    """
    model.generate (the same tokens, the same cropping at block_size), plus:

    exit: per-token early exit while decoding (decode_with_exit), loops = the maximum; no
    token stops before min_loops, the prompt runs at the full budget. loops_used, a list,
    receives the loops each decoded token ran (a list per step, one per row); under
    routing='mor', the recursions its router gave it.

    cuda_graph: on a GPU, each cached step after the prompt is captured once as a CUDA
    graph and replayed (graph_decode_step): the same arithmetic without launching ~2,000
    small kernels from Python per token. Not for early exits, MoR, modulation or sharing.

    kv_sharing: 'none' (exact), or 'first' | 'last' | 'mean' | 'window:N', a cache whose
    core slots are shared across loops (SharedKVCache): memory constant in the budget.
    """
    cfg = model.config
    steps = model.steps(loops, schedule)
    sharing = "last" if cfg.melt else parse_kv_sharing(kv_sharing)[0]  # (MELT's cache is shared)
    if sharing != "none" and (exit is not None or not use_cache):
        raise ValueError(f"kv_sharing={kv_sharing} shares the KV cache: it needs use_cache=True and no exit")
    if exit is not None:
        check_exit(exit, cfg)
        if not use_cache:
            raise ValueError("early exit decodes with the KV cache: use_cache=True")
    graphed = (cuda_graph and use_cache and exit is None and idx.is_cuda and cfg.routing != "mor"
               and cfg.modulation == "none" and sharing == "none")
    bs = cfg.block_size
    cache = replay = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(idx[:, -bs:], schedule=steps)
        elif cache is None or idx.size(1) > bs:
            cache = (StaticKVCache(model.effective_depth(len(steps)), bs) if graphed
                     else new_cache(model, len(steps), kv_sharing))
            logits, _ = model(idx[:, -bs:], schedule=steps, cache=cache)
            replay = None  # a graph holds its cache's buffers: past block_size each step fills a new cache
        elif graphed:
            replay = replay or graph_decode_step(model, steps, cache, idx[:, -1:])
            logits = replay(idx[:, -1:])
        elif exit is None:
            logits, _ = model(idx[:, -1:], schedule=steps, cache=cache)
            if loops_used is not None and isinstance(cache, MoRCache):  # MoR: recursions this token got
                loops_used.append(cache.route_sel[:, :, cache.pos - 1].sum(0).tolist())
        else:
            logits, used = decode_with_exit(model, idx[:, -1:], steps, cache, exit, min_loops)
            if loops_used is not None:
                loops_used.append(used.tolist())
        idx = torch.cat((idx, sample_next(logits[:, -1, :], temperature, top_k, generator)), dim=1)
    return idx


# ---- the command line ----------------------------------------------------------------------------

def open_model(out_dir, init_from=""):
    """(model, tokenizer, what it is) for sample.py and eval.py: the checkpoint in out_dir, or
    with init_from=hf:NAME a released model or a loopgpt export (data/huggingface.py), in
    float32 (autocast gives bfloat16). `what` has source, iter_num, data_meta, train_config.
    Bad input stops with one line."""
    if init_from:
        from data.huggingface import model_from_hf  # (only when asked: it reads hub files)
        if not init_from.startswith("hf:"):
            fail(f"--init_from={init_from}: give hf:NAME (a hub id such as ByteDance/Ouro-1.4B, or a folder with "
                 f"config.json); a checkpoint of ours is --out_dir=DIR")
        try:
            model, tok, _ = model_from_hf(init_from[3:], dtype=torch.float32)
        except ValueError as e:
            fail(f"--init_from={init_from}: {e}")
        if tok is None:
            fail(f"--init_from={init_from}: it has no tokenizer.json (Parcae keeps its tokenizer in a repository of its "
                 f"own): put that tokenizer.json in data/hf/{init_from[3:].replace('/', '--')}/")
        try:
            enc = load_tokenizer(tok)
        except (ValueError, RuntimeError) as e:
            fail(f"--init_from={init_from}: its tokenizer: {e}")
        return model, enc, {"source": init_from, "iter_num": None, "data_meta": {"tokenizer": tok}, "train_config": {}}
    try:
        ckpt = load_checkpoint(f"{out_dir}/ckpt.pt")
        model = model_from_checkpoint(ckpt)
    except ValueError as e:
        fail(str(e))
    try:
        enc = load_tokenizer(ckpt["data_meta"]["tokenizer"])
    except RuntimeError as e:  # GPT-2's BPE files need a network the first time
        fail(str(e))
    return model, enc, {"source": f"{out_dir}/ckpt.pt", "iter_num": ckpt["iter_num"], "data_meta": ckpt["data_meta"],
                        "train_config": ckpt.get("train_config", {})}


def token_text(enc, token, width=6):
    """A token as a short printable cell: a space as ·, control characters escaped (\\n), a
    part of a UTF-8 character as its bytes (\\xe2), an id with no text (the padded vocabulary)
    as <id>, … where clipped to `width`."""
    if token >= enc.n_vocab:
        text = f"<{token}>"
    elif hasattr(enc, "decode_single_token_bytes"):  # (tiktoken: the token's own bytes)
        try:
            text = enc.decode_single_token_bytes(token).decode("utf-8", errors="backslashreplace")
        except KeyError:  # (a hole in a Hugging Face vocabulary)
            text = f"<{token}>"
    else:
        text = enc.decode([token])
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text).replace(" ", "·") or "∅"
    return text if len(text) <= width else text[:width - 1] + "…"


def small(v):
    """A number that may be tiny, readable: 4 decimals, or 2 significant digits below 1e-3."""
    return "0" if v == 0 else f"{v:.4f}" if abs(v) >= 1e-3 else f"{v:.1e}"


def lens_summary(out):
    """Per loop (lists of M floats, means over every position of every row): prob, final,
    kl, move (and lam, conf), and changed, the fraction of positions whose prediction
    differs from the loop before (none at loop 1)."""
    means = {key: out[key].float().mean(dim=(1, 2)).tolist()
             for key in ("prob", "final", "kl", "move", "lam", "conf") if key in out}
    tokens = out["token"]
    means["changed"] = [float("nan")] + (tokens[1:] != tokens[:-1]).float().mean(dim=(1, 2)).tolist()
    return means


def lens_view(out, enc, prompt, positions=12, width=6, tty=False, exit_name=""):
    """The lens of one prompt (lens() of a (1, T) batch) as text: a row per loop, the prompt's
    last `positions` positions as columns, each cell the token predicted next had the model
    stopped at that loop, a changed one highlighted (bold on a terminal, else marked *), and
    per-loop means over all positions on the right."""
    T, M = len(prompt), out["token"].size(0)
    first = max(0, T - positions)
    cols = range(first, T)
    mark = lambda s: f"\033[1;33m{s}\033[0m"  # noqa: E731  bold yellow
    pad = width + (1 if tty else 2)  # a column: the cell, its marker where there is no colour, a space

    def cell(text, changed=False):
        if not tty:
            return (text + ("*" if changed else "")).ljust(pad)
        return (mark(text.ljust(width)) if changed else text.ljust(width)) + " "

    means = lens_summary(out)
    heads = [("p", "prob", 3), ("p(last)", "final", 3), ("changed", "changed", 2), ("KL→last", "kl", None),
             ("move", "move", None), ("λ_t", "lam", 3), ("conf", "conf", 3)]  # (decimals; None: small())
    heads = [(h, k, d) for h, k, d in heads if k in means]
    label = 9
    window = f" (the last --lens_positions={positions})" if first else ""
    extras = (", λ_t Ouro's exit probability" if "lam" in means else "") + (
        ", conf LoopUS's confidence" if "conf" in means else "")
    lines = [f"lens at M={M}, one forward: a cell is the next token if the model stopped after loop t (its state "
             f"through the coda, norm and head); positions {first}..{T - 1} of {T}{window}",
             ("highlighted" if tty else "*") + " = changed since the loop before; · = a space. On the right, means over all "
             f"{T} positions: p the cell's probability, p(last) its probability of loop {M}'s token,",
             f"changed the fraction whose token changed, KL→last KL(p_t || p_M), move ||x_t - x_(t-1)|| / ||x_t||{extras}",
             ""]
    stats = "  ".join(h.rjust(7) for h, _, _ in heads)
    lines.append("position".ljust(label) + "".join(str(p).ljust(pad) for p in cols) + " | " + stats)
    lines.append("input".ljust(label) + "".join(token_text(enc, prompt[p], width).ljust(pad) for p in cols) + " |")
    tokens = out["token"][:, 0].tolist()
    for t in range(M):
        row = "".join(cell(token_text(enc, tokens[t][p], width), t > 0 and tokens[t][p] != tokens[t - 1][p])
                      for p in cols)
        values = "  ".join(("-" if means[k][t] != means[k][t] else small(means[k][t]) if d is None
                            else f"{means[k][t]:.{d}f}").rjust(7) for _, k, d in heads)
        lines.append(f"loop {t + 1}".ljust(label) + row + " | " + values)
    for name, key, what in (("exit", "exit", f"the loop --exit={exit_name} stops at"), ("MoR depth", "depth",
                                                                                      "recursions the router gave")):
        if key in out:
            lines.append(name.ljust(label) + "".join(str(v).ljust(pad) for v in out[key][0, first:].tolist())
                         + f" | {what}, mean {out[key].float().mean().item():.2f} of {M}")
    return "\n".join(lines)


def lens_picture(out, enc, prompt, path, positions=12, color="prob", title="", train_loops=None):
    """The lens of one prompt as a PNG heatmap: rows the loops, columns the last `positions`
    positions (labelled with the input token), colour p_t of the last loop's prediction
    (color='prob') or KL(p_t || p_M) (color='kl'), each cell's predicted token written in
    it where they fit (bold where it changed since the loop before); a dashed line below
    the train budget L = train_loops where the lens runs past it."""
    import matplotlib  # (only for the picture, as eval.py's plots)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    T, M = len(prompt), out["token"].size(0)
    first = max(0, T - positions)
    n = T - first
    values = out["final" if color == "prob" else "kl"][:, 0, first:].float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(min(30, max(5, 0.75 * n + 2.5)), min(24, max(2.5, 0.38 * M + 1.8))))
    image = ax.imshow(values, aspect="auto", cmap="viridis" if color == "prob" else "magma_r",
                      vmin=0, vmax=1 if color == "prob" else max(float(values.max()), 1e-6))
    ax.set_xticks(range(n), [token_text(enc, prompt[p], 8) for p in range(first, T)], rotation=90, fontsize=7)
    ax.set_yticks(range(M), [str(t + 1) for t in range(M)], fontsize=7)
    ax.set(xlabel="input token (the cell: the next token predicted there)", ylabel="loop t")
    if n <= 40 and M <= 40:
        tokens = out["token"][:, 0, first:].tolist()
        for t in range(M):
            for j in range(n):
                bright = values[t, j] > 0.6 if color == "prob" else values[t, j] < 0.4 * values.max()
                ax.text(j, t, token_text(enc, tokens[t][j], 6), ha="center", va="center", fontsize=6,
                        color="black" if bright else "white",
                        fontweight="bold" if t and tokens[t][j] != tokens[t - 1][j] else "normal")
    if train_loops and train_loops < M:
        ax.axhline(train_loops - 0.5, color="white", linestyle="--", linewidth=1)
        ax.annotate(f"L={train_loops}", (1.0, train_loops - 0.5), xycoords=("axes fraction", "data"), fontsize=7,
                    xytext=(3, 0), textcoords="offset points", va="center")
    fig.colorbar(image, ax=ax, label="p_t(last loop's token)" if color == "prob" else "KL(p_t || p_M), nats")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def show_lens(model, enc, x, routes, exit, args, explicit, what, autocast):
    """sample.py --lens: the lens of the prompt x (1, T) at the one route asked for, as text,
    and its picture beside the checkpoint (--lens_png)."""
    if len(routes) != 1:
        fail(f"--lens shows one route: give one budget or one schedule, not {len(routes)} "
             f"({', '.join(name for name, _, _ in routes)})")
    name, route, M = routes[0]
    try:
        with autocast:
            out = lens(model, x, exit=exit, min_loops=args["min_loops"], **route)
    except ValueError as e:
        fail(f"--lens: {e}")
    prompt = x[0].tolist()
    print(f"{what['source']}: {summary(model)} | {name}\n")
    tty = sys.stdout.isatty() and not os.environ.get("NO_COLOR")  # (colour only on a terminal)
    print(lens_view(out, enc, prompt, args["lens_positions"], tty=tty, exit_name=args["exit"]))
    path = args["lens_png"]
    if path == "none":
        return
    if not path:
        out_dir = args["out_dir"]
        if args["init_from"] and "out_dir" not in explicit:  # (eval.py's folder for a released model)
            out_dir = "out-hf-" + args["init_from"].removeprefix("hf:").strip("/").replace("/", "--")
        path = os.path.join(make_dir(out_dir), "lens.png")
    else:
        make_dir(os.path.dirname(os.path.abspath(path)), "lens_png's folder")
    try:
        lens_picture(out, enc, prompt, path, args["lens_positions"], args["lens_color"],
                     f"{what['source']}, {name}: the next token if it stopped after loop t", model.config.n_loops)
    except ImportError:
        fail("the lens picture needs matplotlib: pip install matplotlib (or --lens_png=none)")
    print(f"\nwrote {path}")


def main():
    defaults = dict(
        out_dir="out",
        init_from="",            # hf:NAME: a released looped model (Ouro, Huginn, Parcae, ...) instead of out_dir's
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
        lens=False,              # instead of sampling: what each loop would predict at the prompt's positions, from
                                 # one forward at one budget or schedule (with --exit: where it would stop each token)
        lens_positions=12,       # the lens view's columns: the prompt's last N positions
        lens_png="",             # the lens picture; "" = OUT_DIR/lens.png, none = no picture
        lens_color="prob",       # the picture's colour: prob (p_t of the last loop's token) | kl (KL(p_t || p_M))
    )
    args, explicit = parse_args(sys.argv[1:], defaults, allow_config=False)
    if args["lens"]:
        if args["lens_positions"] < 1:
            fail(f"--lens_positions={args['lens_positions']}: need lens_positions >= 1")
        if args["lens_color"] not in ("prob", "kl"):
            fail(f"--lens_color={args['lens_color']} (valid: prob, kl)")
        if args["kv_sharing"] != "none":
            fail("--lens reads one forward without a KV cache: it takes no --kv_sharing")
    for key, ok, need in (("num_samples", args["num_samples"] >= 1, ">= 1"),
                          ("max_new_tokens", args["max_new_tokens"] >= 1, ">= 1"),
                          ("temperature", 0 <= args["temperature"] < float("inf"), "finite and >= 0 (0 = greedy)"),
                          ("threads", 0 <= args["threads"] <= os.cpu_count(),
                           f"between 0 (torch's default) and this machine's {os.cpu_count()} cores"),
                          ("top_k", args["top_k"] >= 0, ">= 0 (0 = off)"),
                          ("seed", 0 <= args["seed"] < 2**63, "in [0, 2^63)"),
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

    model, enc, what = open_model(args["out_dir"], args["init_from"])
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
    if args["lens"]:
        return show_lens(model, enc, x, routes, exit, args, explicit, what, autocast)
    cache_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    if args["use_cache"]:  # refuse a budget whose KV cache cannot fit before allocating it
        for name, route, M in routes:
            try:
                check_fits(kv_cache_bytes(model, 1, M, cache_dtype, args["kv_sharing"]), f"{name}: the KV cache "
                           f"({args['kv_sharing']} sharing, {cfg.block_size} positions)", device)
            except ValueError as e:
                fail(f"{e}; choose a smaller budget")

    trained = "" if what["iter_num"] is None else f", trained {what['iter_num']} steps"
    print(f"{what['source']}: {summary(model)}{trained} | {device}, {dtype}, {torch.get_num_threads()} threads")
    rows = []
    for name, route, M in routes:
        torch.manual_seed(args["seed"])
        t0 = time.time()
        texts, used = [], []
        for _ in range(args["num_samples"]):
            with autocast:
                y = generate(model, x, args["max_new_tokens"], temperature=args["temperature"],
                             top_k=args["top_k"] or None, use_cache=args["use_cache"], exit=exit,
                             min_loops=args["min_loops"], loops_used=used, kv_sharing=args["kv_sharing"], **route)
            new = [t for t in y[0, len(start_ids):].tolist() if t < enc.n_vocab]  # drop padded-vocab ids
            texts.append(enc.decode(new))
        dt = time.time() - t0
        tok_s = args["num_samples"] * args["max_new_tokens"] / dt
        kv_mb = kv_cache_bytes(model, 1, M, cache_dtype, args["kv_sharing"]) / 2**20
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


if __name__ == "__main__":
    main()
