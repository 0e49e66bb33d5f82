"""
loopgpt: a looped (recurrent-depth, weight-tied) GPT in one file.

    tokens -> wte -> prelude (n_prelude blocks)
           -> core (n_core blocks, looped M times, the same weights every loop)
           -> coda (n_coda blocks) -> norm -> lm_head -> soft-capped logits

`k ⊗ L` means a k-block core looped L times; the effective depth is
n_prelude + k*M + n_coda at loop budget M, and the parameter count never depends on M
(per-loop LoRA is the one deliberate exception). A model trained at L = n_loops may be run
at any budget M >= 1, including M > L, or with a LoopFormer schedule of step sizes.

Read in this order (README.md has the variant table with the papers, docs/model.md the
equations):
- LoopGPTConfig: every model flag.
- Attention, MLP, Block: the nanochat block: pre-norm, parameter-free RMSNorm, RoPE,
  QK-norm, optional GQA, ReLU² MLP, no biases, zero-initialised output projections;
  optional sandwich norm, norm gains, sliding windows, SwiGLU, queries from another
  stream (FLT), LoRA deltas, adaLN gates. init_weights: nanochat's or a paper's init.
- LoopGPT.core_pass: one loop; every `injection` is one branch there, found by
  searching its flag value, e.g. `inj == "full_attn"`.
- LoopGPT.conditioning: `modulation`, TMLT's loop index or LoopFormer's (t, Δ).
- LoopGPT.trunk / forward: the loop over a schedule, truncated backprop, checkpointing,
  per-sequence depth, and the training objectives that read it. Every paper's loss lives
  here (forward's docstring, per_step_loss), not in train.py: each reads loop states that
  only the trunk has, and one place keeps each equation beside its citation.
- generate / decode_with_exit: KV-cached generation and per-token early exit.
- configure_optimizer and, at the end, Muon; the checkpoint format (save / load).
"""

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

INJECTIONS = ("none", "add", "concat", "diag", "attn_first", "full_res", "full_attn")
STATE_INITS = ("prelude", "randn", "randn_small", "zero")
BLOCK_NORMS = ("pre", "sandwich")
MODULATIONS = ("none", "tmlt", "loopformer")
MLPS = ("relu2", "gelu", "swiglu")
ROUTINGS = ("none", "mor")
INITS = ("nanochat", "huginn", "parcae", "loopformer")
LORA_TARGETS = ("q", "k", "v", "o", "fc", "down")  # attention q, k, v, output; MLP in (gate and up), out


@dataclass
class LoopGPTConfig:
    vocab_size: int = 2048
    block_size: int = 256      # context length
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int = 0         # key/value heads for GQA; 0 means n_head (plain multi-head)
    n_prelude: int = 1         # blocks run once before the loop
    n_core: int = 2            # k: blocks in the looped core
    n_coda: int = 1            # blocks run once after the loop
    n_loops: int = 4           # L: loops at train time, and the default budget M
    injection: str = "none"    # one of INJECTIONS: how h_{t-1} and the input enter loop t
    state_init: str = "prelude"  # one of STATE_INITS: h_0 = prelude output, random (Huginn, Parcae), or zero
    norm_state: bool = False   # pass h_t = norm(x_t) between loops, LTi adds the raw embedding (FLT code)
    block_norm: str = "pre"    # one of BLOCK_NORMS
    norm_gains: bool = False   # learnable RMSNorm gains (init 1) in the blocks and the final norm
    norm_eps: float = 0.0      # the blocks' and final RMSNorm's epsilon; 0 = torch's (the dtype's eps)
    embed_norm: bool = True    # norm the token embedding before the first block (nanochat; Llama does not)
    qkv_bias: bool = False     # biases on q, k, v (Qwen2); the output projections never have one
    qk_norm: bool = True       # RMSNorm on queries and keys after RoPE (nanochat, FLT, Parcae)
    window_pattern: str = "L"  # FLT's sliding windows: per core layer, tiled, L = full, S = block_size // 4
    init: str = "nanochat"     # one of INITS: the weights' initial scales (see init_weights)
    modulation: str = "none"   # one of MODULATIONS: condition each loop on its index or on (t, Δ)
    exit_gate: bool = False    # Ouro's exit gate λ_t = σ(w·norm(h_t) + b) on every loop's state
    selective_gate: bool = False  # LoopUS: x_t = h + Ā ⊙ (f(h) - h), Ā from the loop's own update
    confidence_head: bool = False  # LoopUS: σ(w·LN(f(h) - h) + b), will this loop's prediction be right
    melt: bool = False         # MELT: the core's K/V from a gated per-layer latent, one cache slot per layer
    melt_chunk: int = 16       # MELT trains chunk by chunk: later chunks read earlier ones' shared K/V
    lora_rank: int = 0         # per-loop LoRA on the core's matrices (Relaxed Recursive Transformers); 0 = off
    lora_targets: str = "q,v"  # which: some of LORA_TARGETS, or "all" (Relaxed: every linear of the block)
    routing: str = "none"      # one of ROUTINGS: "mor" = Mixture-of-Recursions token routing (see route)
    router_scale: float = 0.1  # MoR's gate g = router_scale * σ(score)
    bptt_k: int = 0            # truncated backprop: only the last k loops get gradients; 0 = all
    checkpoint_loops: bool = False  # recompute each loop's activations in backward (memory)
    mlp: str = "relu2"         # one of MLPS
    mlp_ratio: float = 4.0     # MLP hidden width / n_embd (LoopFormer 2.5)
    tie_embeddings: bool = False
    softcap: float = 15.0      # logits = c * tanh(logits / c); 0 turns it off
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        problems = []
        if self.injection not in INJECTIONS:
            problems.append(f"injection={self.injection!r} (valid: {', '.join(INJECTIONS)})")
        for key, valid in (("state_init", STATE_INITS), ("block_norm", BLOCK_NORMS), ("modulation", MODULATIONS),
                           ("mlp", MLPS), ("routing", ROUTINGS), ("init", INITS)):
            if getattr(self, key) not in valid:
                problems.append(f"{key}={getattr(self, key)!r} (valid: {', '.join(valid)})")
        if not self.window_pattern or set(self.window_pattern) - set("SL"):
            problems.append(f"window_pattern={self.window_pattern!r} must be letters S (short) and L (long), e.g. 'SSSL'")
        if not self.mlp_ratio * self.n_embd >= 1:
            problems.append(f"mlp_ratio={self.mlp_ratio} leaves no hidden units")
        if self.lora_rank < 0:
            problems.append(f"lora_rank={self.lora_rank} must be >= 0 (0 = off)")
        if self.lora_targets != "all" and (not self.lora_targets or set(self.lora_targets.split(",")) - set(LORA_TARGETS)):
            problems.append(f"lora_targets={self.lora_targets!r}: names from {','.join(LORA_TARGETS)}, comma-separated, "
                            "or 'all'")
        if self.bptt_k < 0:
            problems.append(f"bptt_k={self.bptt_k} must be >= 0 (0 = full backprop)")
        if self.routing == "mor" and (self.injection, self.state_init, self.modulation, self.exit_gate,
                                      self.selective_gate, self.confidence_head) != ("none", "prelude", "none", False,
                                                                                      False, False):
            problems.append("routing='mor' routes a plain loop: it needs injection='none', state_init='prelude', "
                            "modulation='none', and no exit_gate, selective_gate or confidence_head")
        if self.melt and (self.injection in ("attn_first", "full_attn") or self.modulation != "none"
                          or self.routing != "none" or self.melt_chunk < 1):
            problems.append("melt=True takes the core's keys and values from its latent: not with injection "
                            "attn_first / full_attn, modulation or routing; and melt_chunk >= 1")
        if self.injection == "none" and self.state_init != "prelude":
            problems.append(f"injection='none' with state_init={self.state_init!r} never reads the input")
        if min(self.vocab_size, self.block_size, self.n_embd, self.n_head, self.n_kv_head) < 1:
            problems.append("need vocab_size, block_size, n_embd, n_head and n_kv_head >= 1")
            raise ValueError("invalid LoopGPTConfig: " + "; ".join(problems))
        if not (self.rope_base > 0 and self.softcap >= 0 and self.router_scale >= 0 and self.norm_eps >= 0):
            problems.append(f"need rope_base > 0, softcap >= 0 (0 = off), router_scale >= 0 and norm_eps >= 0, got "
                            f"{self.rope_base}, {self.softcap}, {self.router_scale}, {self.norm_eps}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            problems.append(f"n_embd={self.n_embd} must split into n_head={self.n_head} heads of even size")
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.n_core < 1 or self.n_loops < 1 or self.n_prelude < 0 or self.n_coda < 0:
            problems.append("need n_core >= 1, n_loops >= 1, n_prelude >= 0, n_coda >= 0")
        if problems:
            raise ValueError("invalid LoopGPTConfig: " + "; ".join(problems))

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


def norm(x):
    # parameter-free RMSNorm (nanochat): no gains to learn, nothing to weight-decay
    return F.rms_norm(x, (x.size(-1),))


class RMSNorm(nn.Module):
    """norm(x), times a learnable gain g (init 1) with norm_gains (Huginn, Parcae, Ouro and
    LoopFormer learn them; nanochat and FLT do not). Without gains it holds no parameters."""

    def __init__(self, d, gain, eps=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d)) if gain else None
        self.eps = eps or None  # None: torch's default, the dtype's machine epsilon

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rotary_table(seq_len, head_dim, base):
    """RoPE tables (seq_len, head_dim): [cos | cos] and [-sin | sin], laid out so that
    apply_rotary is two multiplies and an add (fewer small ops: decoding is bound by them)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rotary(x, cos, sin):
    # x: (B, H, T, hd); rotate each pair (x1_i, x2_i) = (x_i, x_{i+hd/2}) by its position's
    # angle: (x1 cos - x2 sin, x1 sin + x2 cos) = x * [cos | cos] + [x2 | x1] * [-sin | sin]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([x2, x1], dim=-1) * sin


def available_memory(device):
    """Bytes that can still be allocated on `device` (free GPU memory, or the OS's
    MemAvailable), or None where that cannot be read."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_fits(nbytes, what, device="cpu"):
    """Refuse, before allocating, what would not fit in memory: a ValueError with both numbers."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise ValueError(f"{what} needs {nbytes / 2**30:,.1f} GiB, more than the {free / 2**30:,.1f} GiB free on "
                         f"{torch.device(device).type}")


KV_SHARINGS = ("none", "first", "last", "mean", "window:N")


def parse_kv_sharing(text):
    """'none' | 'first' | 'last' | 'mean' | 'window:N' (N >= 1) -> (kind, N), or a ValueError."""
    kind, _, n = str(text).partition(":")
    if kind == "window" and n.isdigit() and int(n) >= 1:
        return kind, int(n)
    if kind in ("none", "first", "last", "mean") and not n:
        return kind, 0
    raise ValueError(f"kv_sharing={text!r} (valid: {', '.join(KV_SHARINGS)})")


class KVCache:
    """
    Keys and values for generation, one slot per (loop, layer) visit: prelude layers,
    then core layer j at loop t, then coda layers. Each loop's attention reads the keys
    of the *same* loop, so a single cache shared by all loops would not reproduce the
    full forward (FLT's official code caches only the last loop).
    Buffers are preallocated to block_size so decoding never concatenates.

    kv_sharing trades that exactness for memory that does not grow with the loops
    (`layout` = (n_prelude, n_core, loops, sharing)); core layer j at loop t uses
      none      slot (t, j): exact, K·M core slots
      last      one slot per core layer, rewritten every loop: a past token's entry is its
                last loop's K/V (Ouro's decode-time sharing, Zhu et al. 2025, Table 14)
      mean      one slot per core layer: a past token's entry is the mean of its loops' K/V
                (Ouro's other option); within a forward each loop still sees its own
      first     one slot per core layer, written at loop 1 only: every later loop reads
                loop 1's K/V, the current tokens' included (Mixture-of-Recursions' recursive
                KV sharing, Bae et al. 2025; prefill shares too, as MoR trains)
      window:N  N slots per core layer, loop t in slot t mod N (Huginn's compressed cache,
                Geiping et al. 2025: a past token's entry is its last loop ≡ t mod N)
    With last, mean and window, a prefill is still exact (every token of the chunk writes
    its loop-t K/V before loop t's attention reads them); tokens decoded later see past
    tokens' shared entries instead of their loop-t ones.
    """

    def __init__(self, n_slots, max_len, layout=None):
        self.n_slots, self.max_len = n_slots, max_len
        self.layout = layout  # (n_prelude, n_core, loops, (kind, N)) or None: one slot per visit
        self.mean_sum = None  # mean: the running sum of the current tokens' K/V per core layer
        self.k = self.v = None
        self.pos = 0  # tokens already in the cache
        self.route_score = self.route_sel = None  # MoR: router scores and selections per recursion
        # static decoding (a CUDA graph replays one token's step): the position lives in a
        # device tensor, each token is written at it and attends to the whole buffer, masked
        self.pos_t = None
        self.masks = {}  # static decoding: this step's key mask per attention window

    def rows(self, table, T):
        """The rows of a per-position table (RoPE, a fixed state noise) for the next T tokens."""
        if self.pos_t is not None:
            return table.index_select(0, self.pos_t)
        return table[self.pos:self.pos + T]

    def static_mask(self, window):
        """Static decoding: which of the max_len keys the token at pos_t sees (itself, the
        tokens before it, within the window if any), shaped (1, 1, 1, max_len)."""
        if window not in self.masks:
            k_pos = torch.arange(self.max_len, device=self.pos_t.device)
            mask = k_pos <= self.pos_t
            if window:
                mask = mask & (self.pos_t - k_pos < window)
            self.masks[window] = mask.view(1, 1, 1, -1)
        return self.masks[window]

    def physical(self, slot):
        """(slot in the buffers, loop t or None outside the core) of logical slot `slot`, the
        model's visit index (prelude layers, then core layer j at loop t, then coda)."""
        if self.layout is None:
            return slot, None
        P, K, M, (kind, N) = self.layout
        if slot < P:
            return slot, None
        if slot >= P + K * M:  # the coda, after the core's shared slots
            return slot - K * M + K * self.core_groups(), None
        t, j = divmod(slot - P, K)
        return P + K * (t % N if kind == "window" else t if kind == "none" else 0) + j, t

    def core_groups(self):
        """How many K-slot groups the core keeps: M without sharing, min(N, M) for a window, 1 else."""
        P, K, M, (kind, N) = self.layout
        return M if kind == "none" else min(N, M) if kind == "window" else 1

    def advance(self, T):
        """The forward over T new tokens is done: mean writes their mean K/V, then pos moves."""
        if self.mean_sum is not None:
            P, end = self.layout[0], self.pos + T
            for j, (ks, vs, n) in enumerate(self.mean_sum):
                self.k[P + j, :, :, self.pos:end] = ks / n
                self.v[P + j, :, :, self.pos:end] = vs / n
            self.mean_sum = None
        self.pos += T

    def nbytes(self):
        """Bytes the K/V buffers hold (0 before the first update)."""
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes

    def update(self, slot, k, v):
        if self.layout is not None and self.layout[3][0] != "none":
            return self.update_shared(slot, k, v)
        if self.k is None:  # allocate on first use
            self.allocate(k)
        if self.pos_t is not None:  # static decoding: fixed shapes, whatever the position
            self.k[slot].index_copy_(2, self.pos_t, k.to(self.k.dtype))
            self.v[slot].index_copy_(2, self.pos_t, v.to(self.v.dtype))
            return self.k[slot], self.v[slot]
        end = self.pos + k.size(2)
        self.k[slot, :, :, self.pos:end] = k
        self.v[slot, :, :, self.pos:end] = v
        return self.k[slot, :, :, :end], self.v[slot, :, :, :end]

    def allocate(self, k):
        # in the dtype attention reads K/V in: under autocast (bf16 on a GPU) that is the
        # autocast dtype, whatever RoPE and QK-norm produced (fp32), so the cache takes
        # half the memory and holds exactly what the uncached forward's attention sees
        device = k.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else k.dtype
        B, H, _, hd = k.shape
        n = self.n_slots
        if self.layout is not None:  # shared core slots: K per group kept, not K per loop
            P, K, M, _ = self.layout
            n = self.n_slots - K * M + K * self.core_groups()
        check_fits(2 * n * B * H * self.max_len * hd * dtype.itemsize,
                   f"the KV cache ({n} (loop, layer) slots x {B} rows x {self.max_len} positions)", k.device)
        self.k = k.new_zeros(n, B, H, self.max_len, hd, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update_mixed(self, slot, melt, base, alpha):
        raise ValueError("MELT's interpolated transition (melt_alpha < 1) is a training mode: set melt_alpha = 1")

    def update_shared(self, slot, k, v):
        """update() under kv_sharing (see the class docstring)."""
        P, K, M, (kind, N) = self.layout
        if self.k is None:
            self.allocate(k)
        p, t = self.physical(slot)
        end = self.pos + k.size(2)
        if kind == "first" and t is not None and t > 0:  # loop 1's K/V serve every later loop
            return self.k[p, :, :, :end], self.v[p, :, :, :end]
        self.k[p, :, :, self.pos:end] = k
        self.v[p, :, :, self.pos:end] = v
        if kind == "mean" and t is not None:
            if self.mean_sum is None:
                self.mean_sum = [None] * K
            j = p - P
            ks, vs, n = self.mean_sum[j] or (0.0, 0.0, 0)
            self.mean_sum[j] = (ks + k.float(), vs + v.float(), n + 1)
        return self.k[p, :, :, :end], self.v[p, :, :, :end]

    def update_route(self, i, n_rec, score, sel=None):
        """MoR: store recursion i's router scores (then its selections) for the new tokens;
        returns everything stored so far for recursion i. Unwritten selections stay False:
        a token that left the loop is never selected again."""
        if self.route_score is None:
            B = score.size(0)
            self.route_score = score.new_zeros(n_rec, B, self.max_len)
            self.route_sel = torch.zeros(n_rec, B, self.max_len, dtype=torch.bool, device=score.device)
        end = self.pos + score.size(1)
        if sel is None:
            self.route_score[i, :, self.pos:end] = score
            return self.route_score[i, :, :end]
        self.route_sel[i, :, self.pos:end] = sel
        return self.route_sel[i, :, :end]


class MeltCache(KVCache):
    """MELT's training-time cache (the forward runs chunk by chunk): the same reads as a KVCache
    with kv_sharing='last' (a past token's K/V are its last loop's), but kept out of place,
    concatenated chunk after chunk, so gradients flow through the earlier chunks' K/V."""

    def __init__(self, layout):
        super().__init__(0, 0, layout)
        self.past, self.new = {}, {}  # buffer slot -> (K, V) of earlier chunks / of this chunk's latest loop
        self.past_base, self.new_base = {}, {}  # phase 1: logical slot -> the plain loop's own (K, V)

    def update(self, slot, k, v):
        p, _ = self.physical(slot)
        self.new[p] = (k, v)
        if p not in self.past:
            return k, v
        past_k, past_v = self.past[p]
        return torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)

    def update_mixed(self, slot, melt, base, alpha):
        """MELT's interpolated transition: attention reads α (shared MELT K/V) + (1 - α) (the
        plain loop's own K/V at this loop), for the past chunks and the current tokens alike."""
        p, _ = self.physical(slot)
        self.new[p] = melt
        self.new_base[slot] = base
        k, v = (alpha * m + (1 - alpha) * b for m, b in zip(melt, base))
        if p not in self.past:
            return k, v
        (pk, pv), (bk, bv) = self.past[p], self.past_base[slot]
        return (torch.cat([alpha * pk + (1 - alpha) * bk, k], dim=2),
                torch.cat([alpha * pv + (1 - alpha) * bv, v], dim=2))

    def advance(self, T):
        for store, new in ((self.past, self.new), (self.past_base, self.new_base)):
            for p, (k, v) in new.items():
                store[p] = (k, v) if p not in store else (torch.cat([store[p][0], k], dim=2),
                                                          torch.cat([store[p][1], v], dim=2))
            new.clear()
        self.pos += T

    def nbytes(self):
        return sum(k.nbytes + v.nbytes for k, v in self.past.values())


def lora_shapes(cfg):
    """{target: (in, out)} of the per-loop LoRA's matrices (lora_targets)."""
    d, kv, hidden = cfg.n_embd, cfg.n_kv_head * (cfg.n_embd // cfg.n_head), round(cfg.mlp_ratio * cfg.n_embd)
    shapes = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d),
              "fc": (d, (2 if cfg.mlp == "swiglu" else 1) * hidden), "down": (hidden, d)}
    names = LORA_TARGETS if cfg.lora_targets == "all" else cfg.lora_targets.split(",")
    return {name: shapes[name] for name in LORA_TARGETS if name in names}


def lora_linear(linear, x, lora, name):
    """linear(x), plus this loop's low-rank delta B A x where lora has one for `name`."""
    y = linear(x)
    if lora is not None and name in lora:
        A, B = lora[name]
        y = y + (x @ A.T) @ B.T
    return y


class Attention(nn.Module):
    def __init__(self, cfg, window=0):
        super().__init__()
        self.window = window  # > 0: each query sees itself and the window - 1 keys before it
        self.n_head, self.n_kv_head, self.qk_norm = cfg.n_head, cfg.n_kv_head, cfg.qk_norm
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q = nn.Linear(cfg.n_embd, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.record = None  # a dict {slot: [outputs]} while recording (record_attention)

    def forward(self, x, rope, cache=None, slot=0, xq=None, lora=None, key_mask=None, kv_base=None, alpha=1.0):
        # xq: where the queries come from (default x). FLT / LTai take them from the
        # previous loop's state while keys and values come from the current stream.
        # lora: this loop's low-rank deltas {target: (A, B)} on the shared matrices
        # key_mask (B, Tk) bool: MoR, only the tokens selected at this recursion are keys
        B, T, C = x.shape
        xq = x if xq is None else xq
        q, k, v = lora_linear(self.q, xq, lora, "q"), lora_linear(self.k, x, lora, "k"), lora_linear(self.v, x, lora, "v")
        # q and k go through RoPE and QK-norm together: one rotation and one norm, not two
        # (half the small ops, which is what a decoding step's time goes to on a CPU)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        qk = torch.cat([q.view(B, T, self.n_head, self.head_dim), k], dim=2)
        cos, sin = rope
        qk = apply_rotary(qk.transpose(1, 2), cos, sin)
        q, k = (norm(qk) if self.qk_norm else qk).split([self.n_head, self.n_kv_head], dim=1)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if kv_base is not None:  # MELT's transition: mix with the K/V the plain layer makes of kv_base
            k_b = lora_linear(self.k, kv_base, lora, "k").view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
            k_b = apply_rotary(k_b, cos, sin)
            k_b = norm(k_b) if self.qk_norm else k_b
            v_b = lora_linear(self.v, kv_base, lora, "v").view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
            k, v = cache.update_mixed(slot, (k, v), (k_b, v_b), alpha)
        elif cache is not None:
            k, v = cache.update(slot, k, v)
        gqa = self.n_head != self.n_kv_head
        if cache is not None and cache.pos_t is not None:  # static decoding: the whole buffer, masked
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.static_mask(self.window), enable_gqa=gqa)
            return self.recorded(slot, lora_linear(self.proj, y.transpose(1, 2).reshape(B, T, C), lora, "o"))
        if self.window and q.size(2) == 1 and key_mask is None:  # decoding: the window is the last keys
            k, v = k[:, :, -self.window:], v[:, :, -self.window:]
        Tq, Tk = q.size(2), k.size(2)
        if key_mask is not None or (self.window and Tq > 1):
            # causal; within the window; over MoR's selected keys (a query always sees itself)
            q_pos = torch.arange(Tk - Tq, Tk, device=q.device).view(-1, 1)
            k_pos = torch.arange(Tk, device=q.device).view(1, -1)
            mask = (k_pos <= q_pos) & ((q_pos - k_pos < self.window) if self.window else True)
            if key_mask is not None:
                mask = mask & (key_mask[:, None, :] | (k_pos == q_pos))  # (B, Tq, Tk)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.view(-1, 1, Tq, Tk), enable_gqa=gqa)
        elif Tq == Tk:  # training, or prefilling an empty cache
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:  # one new token attends to everything cached
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # a chunk after a cached prefix: causal, offset by the prefix length
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.recorded(slot, lora_linear(self.proj, y.transpose(1, 2).reshape(B, T, C), lora, "o"))

    def recorded(self, slot, out):
        """out, also kept in self.record[slot] when recording (MELT's attention-aligned distillation)."""
        if self.record is not None:
            self.record.setdefault(slot, []).append(out)
        return out


class ReLUSquared(torch.autograd.Function):
    """relu(x)² with a hand-written backward, d/dx = 2 relu(x): autograd's version of
    F.relu(x).square() builds four full-size temporaries in backward (pow's and relu's);
    this one builds one. The same gradients bit for bit (tested); bench.py times it."""

    @staticmethod
    def forward(ctx, x):
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r.square()

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return (grad * r).mul_(2)  # x2 is exact in floating point: equal to 2 r grad


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = round(cfg.mlp_ratio * cfg.n_embd)
        # swiglu (Huginn, Ouro): fc makes the gate and the value side by side
        self.fc = nn.Linear(cfg.n_embd, (2 if cfg.mlp == "swiglu" else 1) * hidden, bias=False)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=False)
        self.act = cfg.mlp

    def forward(self, x, lora=None):
        x = lora_linear(self.fc, x, lora, "fc")
        if self.act == "swiglu":
            gate, value = x.chunk(2, dim=-1)
            x = F.silu(gate) * value
        else:
            x = ReLUSquared.apply(x) if self.act == "relu2" else F.gelu(x)
        return lora_linear(self.proj, x, lora, "down")


class Block(nn.Module):
    def __init__(self, cfg, modulated=False, window=0, melt=False):
        super().__init__()
        if melt:  # MELT's element-wise gate z = σ(W_z x + U_z h + b) over [x; h]
            self.melt_gate = nn.Linear(2 * cfg.n_embd, cfg.n_embd)
        self.attn = Attention(cfg, window)
        self.mlp = MLP(cfg)
        self.sandwich = cfg.block_norm == "sandwich"
        # pre-norm: norm_1 before attention, norm_2 before the MLP; sandwich (Huginn) also
        # norms the stream after each residual add: norm_3 after attention, norm_4 after the MLP
        d, gain, eps = cfg.n_embd, cfg.norm_gains, cfg.norm_eps
        self.norm_1, self.norm_2 = RMSNorm(d, gain, eps), RMSNorm(d, gain, eps)
        if self.sandwich:
            self.norm_3, self.norm_4 = RMSNorm(d, gain, eps), RMSNorm(d, gain, eps)
        if modulated:
            # adaLN-Zero without shift (LoopFormer): SiLU(c) -> gates and norm scales for
            # both sub-layers. Zero-initialised (init_weights), so at init the block is the
            # identity whatever c is. DiT keeps biases here, and so do we.
            self.modulation = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)

    def forward(self, x, rope, cache=None, slot=0, xq=None, c=None, lora=None, key_mask=None, latent=None):
        xq = None if xq is None else norm(xq)
        if latent is not None:
            # MELT (arXiv 2605.07721, Eq. 1): the layer keeps a latent per token across loops,
            # h_t = z ⊙ h_{t-1} + (1 - z) ⊙ x_t, z = σ(W_z x_t + U_z h_{t-1} + b) (h_0 = x_1, so
            # one loop is the plain block); keys and values come from h_t, queries from x_t.
            # One K/V row per token and layer then serves every loop (the cache's 'last' slot)
            store, j, alpha = latent
            xn = self.norm_1(x)
            h = xn if store[j] is None else store[j]
            z = torch.sigmoid(self.melt_gate(torch.cat([xn, h], dim=-1)))
            store[j] = h = z * h + (1 - z) * xn
            # alpha < 1: MELT's interpolated transition (phase 1), K/V = α KV(h) + (1 - α) KV(x)
            a = self.attn(h, rope, cache, slot, xn, lora, key_mask, kv_base=xn if alpha < 1 else None, alpha=alpha)
        elif c is None:
            a = self.attn(self.norm_1(x), rope, cache, slot, xq, lora, key_mask)
        if c is None:
            x = self.norm_3(x + a) if self.sandwich else x + a  # Huginn's sandwich norm bounds the stream
            m = self.mlp(self.norm_2(x), lora)
            return self.norm_4(x + m) if self.sandwich else x + m
        gate_attn, gate_mlp, scale_attn, scale_mlp = self.modulation(F.silu(c)).chunk(4, dim=-1)
        a = gate_attn * self.attn(self.norm_1(x) * (1 + scale_attn), rope, cache, slot, xq, lora)
        x = self.norm_3(x + a) if self.sandwich else x + a
        m = gate_mlp * self.mlp(self.norm_2(x) * (1 + scale_mlp), lora)
        return self.norm_4(x + m) if self.sandwich else x + m


class TimestepEmbedder(nn.Module):
    """DiT's embedding of a scalar s: 256 sinusoidal features [cos(s ω_j), sin(s ω_j)],
    ω_j = exp(-ln(1e4) j / 128), then Linear(256, d) -> SiLU -> Linear(d, d)."""

    def __init__(self, d, n_freq=256):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(1e4) * torch.arange(n_freq // 2) / (n_freq // 2)),
                             persistent=False)
        self.fc1 = nn.Linear(n_freq, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, s):
        args = s * self.freqs
        return self.fc2(F.silu(self.fc1(torch.cat([args.cos(), args.sin()]))))


class LoopGPT(nn.Module):
    def __init__(self, cfg: LoopGPTConfig):
        super().__init__()
        self.config = cfg
        d = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        modulated = cfg.modulation != "none"
        # FLT's sliding windows: core layer j is short (a quarter of the context) if the
        # pattern, tiled over the core, says S there; the last core layer always sees everything
        pattern, short = cfg.window_pattern, max(1, cfg.block_size // 4)
        windows = [short if pattern[j % len(pattern)] == "S" and j < cfg.n_core - 1 else 0 for j in range(cfg.n_core)]
        self.core = nn.ModuleList(Block(cfg, modulated, w, cfg.melt) for w in windows)  # looped, weight-tied
        self.coda = nn.ModuleList(Block(cfg) for _ in range(cfg.n_coda))
        self.norm_f = RMSNorm(d, cfg.norm_gains, cfg.norm_eps)  # the final norm, before the head
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.injection == "concat":  # Huginn's adapter W_a: [h; e] (2d) -> d
            self.adapter = nn.Linear(2 * d, d, bias=False)
        if cfg.injection == "diag":
            # Parcae: per-channel decay A, step size Δ, input matrix B on the normed input,
            # and C, which maps the final state back to the stream before the coda
            self.diag_A_log = nn.Parameter(torch.zeros(d))
            self.diag_dt_bias = nn.Parameter(torch.zeros(d))
            self.diag_B = nn.Linear(d, d, bias=False)
            self.diag_norm = RMSNorm(d, cfg.norm_gains)
            self.diag_C = nn.Linear(d, d, bias=False)
        if cfg.lora_rank:
            # Relaxed Recursive Transformers: loop t's core block j adds B A x to each target
            # matrix W x (W: out x in; A: r x in, B: out x r), one (A, B) pair per loop, block
            # and target; B starts at zero, so at init every loop is the shared block. These
            # are the only parameters that grow with n_loops.
            for name, (n_in, n_out) in lora_shapes(cfg).items():
                setattr(self, f"lora_A_{name}", nn.Parameter(torch.empty(cfg.n_loops, cfg.n_core, cfg.lora_rank, n_in)))
                setattr(self, f"lora_B_{name}", nn.Parameter(torch.zeros(cfg.n_loops, cfg.n_core, n_out, cfg.lora_rank)))
        if cfg.routing == "mor":  # Mixture-of-Recursions: one router score per recursion, per token
            self.router = nn.Linear(d, cfg.n_loops, bias=False)
        if cfg.exit_gate:  # Ouro: after each loop, the probability of stopping there, per token
            self.exit_gate = nn.Linear(d, 1)
        if cfg.selective_gate:  # LoopUS: per-token, per-channel step size Δ from the loop's update
            self.gate_down = nn.Linear(d, math.ceil(d / 16), bias=False)
            self.gate_up = nn.Linear(math.ceil(d / 16), d)
            self.gate_A_log = nn.Parameter(torch.zeros(d))
        if cfg.confidence_head:  # LoopUS: a LayerNorm and a linear read of the loop's update
            self.confidence_norm = nn.LayerNorm(d)
            self.confidence = nn.Linear(d, 1)
        if cfg.modulation == "tmlt":  # embeds the loop index i (LoopFormer's TMLT baseline)
            self.time_embed = TimestepEmbedder(d)
        if cfg.modulation == "loopformer":  # embeds the normalised time t and the step size Δ
            self.time_embed = TimestepEmbedder(d)
            self.step_embed = TimestepEmbedder(d)
        # RoPE tables are recomputed, not saved: they are a function of the config
        check_fits(3 * 4 * cfg.block_size * (2 * d // cfg.n_head + (d if cfg.state_init.startswith("randn") else 0)),
                   f"block_size={cfg.block_size} (its position tables, with their temporaries)")
        cos, sin = rotary_table(cfg.block_size, d // cfg.n_head, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.state_init.startswith("randn"):  # the fixed draw used at inference, see initial_state
            self.register_buffer("state_noise", self.random_state(cfg.block_size, torch.Generator().manual_seed(0)),
                                 persistent=False)
        self.init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.melt_alpha = 1.0  # MELT's phase-1 interpolation (train.py sets it; 1 = MELT itself)

    @torch.no_grad()
    def init_weights(self):
        """
        init='nanochat' (default): hidden matrices N(0, 1/fan_in), output projections zero,
        so every block starts as the identity and looping more cannot blow the stream up.
        init='huginn' (Geiping et al. 2025, after Takase et al.'s small init): every matrix
        N(0, 2/(5d)), output projections divided by sqrt(2 x effective depth), nothing zero,
        and a random adapter. init='parcae': N(0, 2/(5d)) everywhere (the embedding too),
        zero output projections. init='loopformer' (nanoGPT's): N(0, 0.02²), output projections
        divided by sqrt(2 x blocks), the adaLN modulation too (its code re-initialises it).
        """
        cfg = self.config
        small = math.sqrt(2 / (5 * cfg.n_embd))
        for name, p in self.named_parameters():
            if ".modulation." in name:
                # adaLN-Zero: zero gates make a modulated block the identity at init. The
                # LoopFormer paper says so; its public code re-initialises these to
                # N(0, 0.02) (init='loopformer' does that too).
                if cfg.init == "loopformer" and p.dim() == 2:
                    nn.init.normal_(p, std=0.02)
                else:
                    nn.init.zeros_(p)
            elif p.dim() == 2 and name.startswith(("prelude", "core", "coda")):
                out = name.endswith("proj.weight")
                if cfg.init == "huginn":
                    nn.init.normal_(p, std=small / math.sqrt(2 * self.effective_depth()) if out else small)
                elif cfg.init == "loopformer":
                    n_blocks = cfg.n_prelude + cfg.n_core + cfg.n_coda
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_blocks) if out else 0.02)
                elif cfg.init == "parcae" and not out:  # Parcae: small init, zero output projections
                    nn.init.normal_(p, std=small)
                elif out and not (cfg.modulation != "none" and name.startswith("core")):
                    # zero-init output projections. A modulated block is already the
                    # identity through its zero gates, and zero gates times a zero
                    # projection would never get a gradient.
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, std=p.size(1) ** -0.5)
        if cfg.init == "nanochat":
            # the embedding is RMS-normed after lookup, so its scale is free; a tied
            # matrix also produces the logits, so it gets the small output scale
            nn.init.normal_(self.wte.weight, std=cfg.n_embd ** -0.5 if cfg.tie_embeddings else 1.0)
            nn.init.normal_(self.lm_head.weight, std=cfg.n_embd ** -0.5 if cfg.tie_embeddings else 0.001)
        else:
            std = 0.02 if cfg.init == "loopformer" else small
            nn.init.normal_(self.wte.weight, std=std)
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in (*self.prelude, *self.core, *self.coda):  # qkv_bias: biases start at zero
            for lin in (block.attn.q, block.attn.k, block.attn.v):
                if lin.bias is not None:
                    lin.bias.zero_()
        if cfg.lora_rank:
            for name, (n_in, _) in lora_shapes(cfg).items():
                nn.init.normal_(getattr(self, f"lora_A_{name}"), std=n_in ** -0.5)
                getattr(self, f"lora_B_{name}").zero_()
        if cfg.routing == "mor":  # N(0, 0.02) as in the MoR code
            nn.init.normal_(self.router.weight, std=0.02)
        if cfg.melt:
            # MELT: z = σ(-4) ≈ 0.02 whatever the input, so a looped model converted to MELT
            # starts as itself with each token's last-loop K/V shared (kv_sharing='last'); the
            # paper gives no init (our choice)
            for block in self.core:
                block.melt_gate.weight.zero_()
                block.melt_gate.bias.fill_(-4.0)
        if cfg.selective_gate:
            # LoopUS code (Mamba's): A_log = log(1..d), so channel i decays at rate i; the step
            # size starts log-uniform in [0.001, 0.1] per channel (the bias is its softplus⁻¹)
            r = self.gate_down.out_features
            nn.init.uniform_(self.gate_down.weight, -cfg.n_embd ** -0.5, cfg.n_embd ** -0.5)
            nn.init.uniform_(self.gate_up.weight, -r ** -0.5, r ** -0.5)
            dt = torch.exp(torch.empty(cfg.n_embd).uniform_(math.log(1e-3), math.log(0.1))).clamp_min(1e-4)
            self.gate_up.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.gate_A_log.copy_(torch.log(torch.arange(1, cfg.n_embd + 1, dtype=torch.float32)))
        if cfg.confidence_head:
            nn.init.normal_(self.confidence.weight, std=cfg.n_embd ** -0.5)
            nn.init.zeros_(self.confidence.bias)
        if cfg.injection == "concat" and cfg.init == "huginn":  # Huginn: a random W_a, N(0, 2/(5d))
            nn.init.normal_(self.adapter.weight, std=small)
        elif cfg.injection == "concat":
            # W_a = [I | 0]: at init the adapter passes the state through; the input half
            # starts at zero and is learned. (With Huginn's sandwich blocks this stalls
            # training, measured: use init='huginn' there, see the README.)
            self.adapter.weight.zero_()
            self.adapter.weight[:, :cfg.n_embd].copy_(torch.eye(cfg.n_embd))
        if cfg.injection == "diag":
            # A_log = 0 and Δ = 0.805 give Ā = exp(-Δ) ≈ 0.447 (Parcae's init); B = I;
            # C = I, or random N(0, 2/(5d)) as Parcae's code has it
            self.diag_A_log.zero_()
            self.diag_dt_bias.fill_(math.log(math.expm1(-math.log(0.447))))  # softplus⁻¹(0.805)
            self.diag_B.weight.copy_(torch.eye(cfg.n_embd))
            if cfg.init == "parcae":
                nn.init.normal_(self.diag_C.weight, std=small)
            else:
                self.diag_C.weight.copy_(torch.eye(cfg.n_embd))

    # ---- the loop --------------------------------------------------------------------

    def initial_state(self, e, cache=None):
        """h_0, chosen by `state_init`."""
        init = self.config.state_init
        if init == "prelude":
            return e
        if init == "zero":
            return torch.zeros_like(e)
        # randn (Huginn), randn_small (Parcae): a fresh random state every training forward,
        # so the core learns to start from anywhere. At inference a fixed draw per position
        # is used instead (both official codes draw afresh there too): the same prompt then
        # gives the same text, and the KV cache stays exact.
        if self.training:
            return self.random_state(e.size(0) * e.size(1), device=e.device).view_as(e).to(e.dtype)
        noise = self.state_noise[:e.size(1)] if cache is None else cache.rows(self.state_noise, e.size(1))
        return noise.to(e.dtype).expand_as(e)

    def random_state(self, n, generator=None, device=None):
        """n random states: truncated normal, std sqrt(2/(5d)) cut at ±3 std (both papers'
        init std); Huginn scales it by sqrt(d) to the scale of a normed state (RMS ≈ 0.6),
        Parcae does not (RMS ≈ 0.02 at d = 768)."""
        d = self.config.n_embd
        std = math.sqrt(2 / (5 * d))
        x = torch.empty(n, d, device=device)
        nn.init.trunc_normal_(x, std=std, a=-3 * std, b=3 * std, generator=generator)
        return x * math.sqrt(d) if self.config.state_init == "randn" else x

    def core_pass(self, h, e, t, rope, cache, slot, c=None, key_mask=None, latents=None):
        """
        Loop t (0-based) of the core: previous state h = h_{t-1}, loop input e (prelude
        output, i.e. the normed embedding when n_prelude = 0). Returns the core's output.
        Each `injection` is one branch here. With state_init='prelude',
        h_0 = e and loop 1 is a plain pass of the core in every variant. c is the loop's
        conditioning vector when the core is modulated (see `conditioning`).
        """
        inj = self.config.injection
        plain = t == 0 and self.config.state_init == "prelude"
        # 1) what enters the core
        if plain or inj == "none":
            # LT / Base-Loop (Saunshi et al. 2025): the state flows straight through
            x = h
        elif inj == "add":
            # LTi, input injection (Yang et al. 2024): x = norm(e + h_{t-1})
            x = norm(e + h)
        elif inj == "concat":
            # Huginn adapter (Geiping et al. 2025): x = W_a [h_{t-1}; e]. In Huginn h_{t-1}
            # leaves the core through a sandwich norm, so it has a bounded scale, and h_0 (its
            # random state) enters raw, as here with block_norm='sandwich'. Pre-norm blocks
            # pass norm(h_{t-1}): their raw stream would grow loop after loop (RMS 174 ->
            # 98,000 over 8 loops, measured)
            x = self.adapter(torch.cat([h if self.config.block_norm == "sandwich" else norm(h), e], dim=-1))
        elif inj == "diag":
            # Parcae: a stable diagonal linear recurrence around the core,
            # x = Ā ⊙ h_{t-1} + Δ ⊙ (B ē), Δ = softplus(dt_bias), Ā = exp(-Δ ⊙ exp(A_log))
            # so 0 < Ā < 1 by construction whatever the weights; ē = norm(e) (with a gain
            # under norm_gains); the coda reads C h_M (run_coda)
            A_bar, dt = self.parcae_decay()
            x = A_bar * h + dt * self.diag_B(self.diag_norm(e))
        else:
            # attn_first / full_res / full_attn (FLT paper, arXiv 2605.18797): the stream
            # restarts from the input every loop; h_{t-1} enters inside the layers below
            x = norm(e)
        # 2) the core's layers
        for j, block in enumerate(self.core):
            xq = None
            if not plain:
                if inj == "full_res":
                    # FLTres: before every layer, x = norm(x + h_{t-1})
                    x = norm(x + h)
                elif inj == "full_attn" or (inj == "attn_first" and j == 0):
                    # FLT: every layer's attention takes its queries from h_{t-1} and its
                    # keys/values from the current stream; LTai does it in layer 1 only
                    xq = h
            x = block(x, rope, cache, slot + j, xq, c, self.lora(t, j), key_mask,
                      None if latents is None else (latents, j, self.melt_alpha))
        return x

    def route(self, h, i, cand, cache, pos):
        """
        Mixture-of-Recursions (Bae et al. 2025), expert-choice routing for recursion i of
        N = n_loops. Recursion i keeps a fraction (N-i)/N of the tokens, chosen
        among those recursion i-1 kept (cand, (B, T) bool), so a token's depth is the
        number of recursions before it is dropped. Router score s_i = w_i · h, on the raw
        state (MoR code).

        MoR picks the top-k scores over the whole sequence, which lets a token's depth
        depend on tokens after it. We keep the capacity but make the choice causal: token
        t is kept if the number of candidates at positions <= t that score higher than it,
        plus 1/2, is below keep * n_t, with n_t the number of those candidates and
        keep = (N-i)/(N-i+1) the fraction of candidates to keep. For exchangeable scores
        that keeps the same fraction in expectation, training and generation make the
        same choice, and generation only needs the scores and
        selections of earlier tokens, which the KV cache stores per recursion.
        Returns (sel (B, T) bool, gate g = router_scale * σ(s) (B, T), scores s, key mask
        (B, pos+T): the tokens selected at recursion i, the only keys attention sees).
        """
        N = self.config.n_loops
        s = self.router(h)[..., i].float()
        T = s.size(1)
        s_all, cand_all = s, cand
        if cache is not None:
            s_all = cache.update_route(i, N, s)
            cand_all = cache.route_sel[i - 1, :, :pos + T] if i > 0 else torch.ones_like(s_all, dtype=torch.bool)
        q_pos = torch.arange(pos, pos + T, device=s.device).view(-1, 1)
        earlier = torch.arange(pos + T, device=s.device).view(1, -1) < q_pos  # (T, pos+T)
        beaten_by = (cand_all[:, None, :] & earlier & (s_all[:, None, :] > s[:, :, None])).sum(-1)
        n_cand = cand_all.cumsum(-1)[:, pos:]  # candidates at positions <= t
        keep = (N - i) / (N - i + 1) if i > 0 else 1.0  # capacities 1, (N-1)/N, ..., 1/N of all tokens
        sel = cand & (beaten_by + 0.5 < keep * n_cand)  # rank r stands for the middle of its 1/n slice: unbiased
        key_mask = sel if cache is None else cache.update_route(i, N, s, sel)
        return sel, self.config.router_scale * torch.sigmoid(s), s, key_mask

    def lora(self, t, j):
        """Loop t's LoRA factors for core block j, {target: (A, B)}; loops past n_loops reuse
        the last loop's."""
        if not self.config.lora_rank:
            return None
        t = min(t, self.config.n_loops - 1)
        return {name: (getattr(self, f"lora_A_{name}")[t, j], getattr(self, f"lora_B_{name}")[t, j])
                for name in lora_shapes(self.config)}

    def selective_update(self, x_new, x):
        """
        LoopUS's selective gate (Park et al. 2026, arXiv 2605.11011): the loop's proposal
        f(h) = x_new is mixed into the previous state x per token and channel,
            x_t = Ā ⊙ f(h) + (1 - Ā) ⊙ x = x + Ā ⊙ (f(h) - x),
            Ā = exp(-Δ ⊙ exp(A_log)),  Δ = softplus(W_up W_down (f(h) - x) + b),
        so 0 < Ā < 1 (a convex step towards the proposal, against hidden-state drift) and the
        step size depends on the update itself (Mamba's selective Δ, low rank d/16).
        Without the gate, x_new.
        """
        if not self.config.selective_gate:
            return x_new
        update = x_new - x
        dt = F.softplus(self.gate_up(self.gate_down(update)))
        return x + torch.exp(-dt * torch.exp(self.gate_A_log)) * update

    def confidence_logit(self, update):
        """LoopUS's confidence head on a loop's update f(h) - x (before the gate): the logit of
        "this loop's prediction is right", trained by BCE (per_step_loss), read by exit='confidence'."""
        return self.confidence(self.confidence_norm(update)).squeeze(-1)

    def parcae_decay(self):
        """Parcae's (Ā, Δ): Δ = softplus(dt_bias) > 0 and Ā = exp(-Δ ⊙ exp(A_log)) in (0, 1)."""
        dt = F.softplus(self.diag_dt_bias)
        return torch.exp(-dt * torch.exp(self.diag_A_log)), dt

    def steps(self, loops=None, schedule=None):
        """The loop schedule as step sizes Δ_1..Δ_M that sum to 1: `schedule` if given,
        else M = `loops` (default n_loops) uniform steps of 1/M."""
        if schedule is None:
            M = check_loops(self.config.n_loops if loops is None else loops)
            steps = [1.0 / M] * M
        else:
            steps = check_schedule(schedule, loops, self.config.modulation)
        if self.config.routing == "mor" and len(steps) > self.config.n_loops:
            raise ValueError(f"routing='mor' has a capacity for each of its n_loops={self.config.n_loops} "
                             f"recursions: budget {len(steps)} is too many")
        return steps

    def conditioning(self, i, t, dt):
        """The vector c that modulates loop i (0-based), which starts at time t with step dt."""
        mod = self.config.modulation
        if mod == "none":
            return None
        device = self.wte.weight.device
        if mod == "tmlt":
            # TMLT: condition on the integer loop index only (LoopFormer's baseline)
            return self.time_embed(torch.tensor(float(i), device=device))
        # LoopFormer: c = TE_t(t) + TE_Δ(Δ), t = time already travelled in [0, 1), Δ = this
        # step's size; a coarse step can learn to do more than a fine one
        return self.time_embed(torch.tensor(t, device=device)) + self.step_embed(torch.tensor(dt, device=device))

    def trunk(self, idx, steps, cache=None, states=None, depths=None, routes=None, updates=None):
        """Everything up to the final norm for the schedule `steps`: returns the coda's
        output (B, T, d). If `states` is a list, each loop's output is appended to it.
        depths (B,): Parcae's per-sequence depth, row b runs depths[b] <= len(steps)
        loops and keeps its state outside them (see the bptt note in the loop). routes: a list that receives MoR's
        (scores, candidates, selections) per recursion. updates: a list that receives each
        loop's update f(h) - x before the selective gate (the confidence head's input)."""
        cfg = self.config
        B, T = idx.shape
        if cfg.melt and (cache is None or T > cfg.melt_chunk):
            return self.melt_chunks(idx, steps, cache, states, depths, routes, updates)
        pos = cache.pos if cache is not None else 0
        if pos + T > cfg.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds block_size={cfg.block_size}")
        if cache is None:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        else:
            rope = (cache.rows(self.rope_cos, T), cache.rows(self.rope_sin, T))
            cache.masks = {}  # static decoding: one mask per window for this step, shared by the layers

        e, h = self.loop_input(idx, rope, cache)
        x = h  # the last loop's output; h_0 before the first
        slot = cfg.n_prelude  # KV-cache slot of the next (loop, layer) visit
        M = len(steps)
        if depths is not None:
            # Parcae's per-sequence depth with truncated backprop (Parcae code): row b runs
            # n_b = d_b - min(d_b, k) loops without gradient, then min(d_b, k) with, so
            # every row sends gradient through the core, however shallow. The batch runs
            # max(n_b) gradient-free loops, then max min(d_b, k) with gradient; a row takes
            # part in the first n_b of the one and the first min(d_b, k) of the other
            n_grad = depths.clamp(max=cfg.bptt_k or M).view(-1, 1, 1)
            n_free = depths.view(-1, 1, 1) - n_grad
            grad_from = max(0, M - cfg.bptt_k) if cfg.bptt_k else 0  # the first loop with gradient
        mor = cfg.routing == "mor"  # (steps() has checked M <= n_loops)
        latents = [None] * cfg.n_core if cfg.melt else None  # MELT: each core layer's latent, across loops
        sel = torch.ones(B, T, dtype=torch.bool, device=idx.device)  # MoR: tokens still in the loop
        for i, dt in enumerate(steps):
            c = self.conditioning(i, math.fsum(steps[:i]), dt)
            # truncated backprop through depth (Huginn): loops before the last bptt_k run
            # without a graph; e still gets gradients through the later loops' injection
            truncated = cfg.bptt_k > 0 and i < M - cfg.bptt_k
            with torch.no_grad() if truncated else nullcontext():
                key_mask = None
                if mor:
                    cand = sel
                    sel, gate, score, key_mask = self.route(x, i, cand, cache, pos)
                    if routes is not None:
                        routes.append((score, cand, sel))
                    if not sel.any():  # nobody left: deeper recursions change nothing (and are masked)
                        break
                if cfg.checkpoint_loops and torch.is_grad_enabled() and cache is None:
                    # keep only each loop's input; recompute the loop's activations in backward
                    x_new = checkpoint(self.core_pass, h, e, i, rope, None, slot, c, key_mask, use_reentrant=False)
                else:
                    x_new = self.core_pass(h, e, i, rope, cache, slot, c, key_mask, latents)
                if mor:
                    # MoR code: selected tokens take h + g f(h), f the core with its residuals,
                    # i.e. (1 + g) h + g Δ(h); the others keep h
                    x_new = x + (sel * gate).unsqueeze(-1).to(x.dtype) * x_new
                if updates is not None:
                    updates.append(x_new - x)
                x_new = self.selective_update(x_new, x)
            if depths is not None:  # a row outside its loops keeps its state
                x_new = torch.where(i < n_free if truncated else i - grad_from < n_grad, x_new, x)
            x = x_new
            slot += cfg.n_core
            if states is not None:
                states.append(x)
            h = self.next_state(x)
        slot = cfg.n_prelude + cfg.n_core * M  # the coda's slots (a MoR loop may have stopped early)
        x = self.run_coda(x, rope, cache, slot)
        if cache is not None:
            cache.advance(T)
        return x

    def melt_chunks(self, idx, steps, cache, states, depths, routes, updates):
        """
        MELT's forward, chunk by chunk (its chunk-wise training, melt_chunk tokens at a time):
        each chunk runs every loop, its tokens attending to each other at the current loop
        and to the earlier chunks' shared K/V (their last loop's, from their latents), as
        tokens decoded later will. One chunk of one token at a time is cached decoding itself.
        """
        if depths is not None:  # (routes: MoR's, which melt=True excludes, so they stay empty)
            raise ValueError("melt=True runs chunk by chunk: no per-sequence depths")
        if cache is None:
            cache = MeltCache((self.config.n_prelude, self.config.n_core, len(steps), ("last", 0)))
        outs, chunk_states, chunk_updates = [], [], []
        for s in range(0, idx.size(1), self.config.melt_chunk):
            st = [] if states is not None else None
            up = [] if updates is not None else None
            outs.append(self.trunk(idx[:, s:s + self.config.melt_chunk], steps, cache, st, None, None, up))
            chunk_states.append(st)
            chunk_updates.append(up)
        for merged, parts in ((states, chunk_states), (updates, chunk_updates)):
            if merged is not None:
                merged.extend(torch.cat(loop, dim=1) for loop in zip(*parts))
        return torch.cat(outs, dim=1)

    def loop_input(self, idx, rope, cache):
        """Embedding and prelude: returns the loop input e and the initial state h_0."""
        emb = self.wte(idx)
        x = norm(emb) if self.config.embed_norm else emb
        for slot, block in enumerate(self.prelude):
            x = block(x, rope, cache, slot)
        if not self.config.norm_state:
            return x, self.initial_state(x, cache)
        # the FLT code's convention: every state that enters a loop is normed, h_0 included,
        # and the input is the raw embedding (with no prelude), so LTi's
        # x = norm(e + h_{t-1}) adds a learned-scale embedding to a unit-RMS state
        e = emb if not self.prelude else x
        return e, norm(self.initial_state(e, cache))

    def next_state(self, x):
        """h_t, what loop t+1 reads of loop t's output x_t: the raw stream (Saunshi et al.,
        LoopFormer's Base-Loop), or norm(x_t) (FLT code: always for its FLT / FLTres / LTai,
        with norm_state for LT and LTi)."""
        if self.config.norm_state or self.config.injection in ("attn_first", "full_res", "full_attn"):
            return norm(x)
        return x

    def run_coda(self, x, rope=None, cache=None, slot=0):
        if rope is None:  # a prefix route in training: positions start at 0
            rope = (self.rope_cos[:x.size(1)], self.rope_sin[:x.size(1)])
        if self.config.injection == "diag":  # Parcae: C maps the recurrent state back to the stream
            x = self.diag_C(x)
        for block in self.coda:
            x = block(x, rope, cache, slot)
            slot += 1
        return x

    def logits(self, h):
        logits = self.lm_head(h).float()
        if self.config.softcap > 0:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        return logits

    def forward(self, idx, targets=None, loops=None, cache=None, schedule=None,
                short=None, lambda_short=0.1, lambda_cons=0.1, depths=None,
                step_weights=None, gate_stage=0, gate_beta=0.1, gate_k=50.0, gate_gamma=0.005, lambda_router=1e-3,
                lambda_mono=0.0):
        """
        idx (B, T) token ids; targets (B, T) or None (-1 = ignored position);
        loops = budget M (default n_loops, any M >= 1) or schedule = step sizes summing to 1
        (modulation='loopformer'); cache = KVCache for generation.
        Returns (logits (B, T, V) in float32, loss or None).

        depths (B,) ints (training, Parcae's per-sequence depth): row b runs depths[b]
        loops, the batch max(depths); with bptt_k = k the last min(depths[b], k) of them
        get gradients. A row's loops are not aligned with the batch's, so the loops must
        not depend on their index: no modulation, no per-loop LoRA, and a first loop that
        is not special (state_init other than 'prelude', or injection='none').

        step_weights (training): per-step supervision, loss = Σ_t w_t CE_t / Σ_t w_t with
        CE_t the loss of the shared coda and head on loop t's state (FLT's STEP / FEW).
        gate_stage (training, needs exit_gate): Ouro's gate (Zhu et al. 2025, arXiv
        2510.25741). Stage 1 (Eq. 4): loss = Σ_t p_t CE_t - gate_beta * H(p),
        p_t = λ_t Π_{j<t}(1-λ_j), the last loop takes the rest. Stage 2 (Eq. 5-6, the LM
        frozen): (1/T) Σ_{t=2..T} BCE(1 - λ_t, σ(gate_k (I_t - gate_gamma))) with
        I_t = max(0, CE_{t-1} - CE_t) detached: continue after loops that still helped.

        short (training): an auxiliary short route. A schedule (list) is
        LoopFormer's shortcut route, run as a second forward; an int S is the prefix route
        of the early-exit baselines, the first S loops of the full route read off its
        intermediate state (no second forward). The loss is then
        CE(full) + lambda_short * CE(short) + lambda_cons * MSE(sg(h_full), h_short),
        h = the hidden state after the final norm.

        routing='mor' adds lambda_router * Σ_i mean BCE(σ(s_i), selected_i) over recursion
        i's candidates (MoR's auxiliary loss: the router's sigmoid learns to say who is kept).

        LoopUS (Park et al. 2026, arXiv 2605.11011) trains a random depth M per step with
        gradients through its last w = bptt_k loops (its "random deep supervision", here one
        depth per optimizer step), adding lambda_mono * SiLU(CE_M - sg(CE_{M-w})) (L_Mono:
        the window must not make the prediction worse; no term when M <= w) and, with
        confidence_head, BCE(σ(q_M), 1[argmax p_M = y]) per token (L_Q, weight 1): q_M =
        confidence_logit(f(h) - x) of the last loop learns whether its prediction is right.
        """
        if depths is not None:
            if schedule is not None or short is not None or cache is not None:
                raise ValueError("per-sequence depths go with loops only (no schedule, short route or cache)")
            loops = int(depths.max())
            problem = per_sequence_problem(self.config)
            if problem:
                raise ValueError(problem)
        per_step = targets is not None and (step_weights is not None or gate_stage)
        if per_step and (short is not None or (step_weights is not None and gate_stage)):
            raise ValueError("use one of: a short route, step_weights, gate_stage")
        if lambda_mono and (per_step or short is not None or depths is not None):
            raise ValueError("lambda_mono (LoopUS) goes with a plain training forward: no step_weights, gate_stage, "
                             "short route or per-sequence depths")
        steps = self.steps(loops, schedule)
        states = [] if isinstance(short, int) or per_step or (lambda_mono and targets is not None) else None
        routes = [] if self.config.routing == "mor" and targets is not None else None
        updates = [] if self.config.confidence_head and targets is not None else None
        with torch.no_grad() if gate_stage == 2 else nullcontext():  # stage 2 trains the gate only
            h = self.norm_f(self.trunk(idx, steps, cache, states, depths, routes, updates))
            logits = self.logits(h)
        if targets is None:
            return logits, None
        y = targets.reshape(-1)
        if per_step:
            loss = self.per_step_loss(states, logits, targets, step_weights, gate_stage, gate_beta, gate_k, gate_gamma)
        else:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y, ignore_index=-1)
        if updates and gate_stage != 2:  # LoopUS's L_Q: is the last loop's argmax right, per token
            valid = y != -1
            right = (logits.detach().argmax(-1).reshape(-1) == y).float()
            loss = loss + F.binary_cross_entropy_with_logits(self.confidence_logit(updates[-1]).reshape(-1)[valid],
                                                             right[valid])
        if lambda_mono and len(steps) > (self.config.bptt_k or 1):
            with torch.no_grad():  # LoopUS's L_Mono against the state where the gradient window starts
                start = self.logits(self.norm_f(self.run_coda(states[len(steps) - (self.config.bptt_k or 1) - 1])))
                ce_start = F.cross_entropy(start.view(-1, start.size(-1)), y, ignore_index=-1)
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)), y, ignore_index=-1)
            loss = loss + lambda_mono * F.silu(ce - ce_start)
        if per_step:
            return logits, loss
        if short is not None:
            if isinstance(short, int):
                if not 1 <= short <= len(steps):
                    raise ValueError(f"prefix route of {short} loops in a route of {len(steps)}")
                h_short = self.norm_f(self.run_coda(states[short - 1]))
            else:
                h_short = self.norm_f(self.trunk(idx, self.steps(None, short)))
            ce_short = F.cross_entropy(self.logits(h_short).view(-1, logits.size(-1)), targets.reshape(-1),
                                       ignore_index=-1)
            # stop-gradient on the full route: the short route learns to match it, not vice versa
            loss = loss + lambda_short * ce_short + lambda_cons * F.mse_loss(h_short, h.detach())
        if routes:  # MoR code: Σ over recursions of the mean BCE over that recursion's candidates
            loss = loss + lambda_router * sum(F.binary_cross_entropy_with_logits(s[c], k[c].float())
                                              for s, c, k in routes)
        return logits, loss

    def per_step_loss(self, states, logits, targets, step_weights, gate_stage, beta, k, gamma):
        """Losses that read every loop's state (see forward): per-step supervision, Ouro's gate."""
        M, V = len(states), logits.size(-1)
        if gate_stage and not self.config.exit_gate:
            raise ValueError("gate_stage needs a model with exit_gate=True")
        if gate_stage == 2 and M < 2:
            raise ValueError("gate stage 2 compares consecutive loops: it needs at least 2")
        y = targets.reshape(-1)
        valid = (y != -1).float()

        def ce(lg):  # per-token cross-entropy, (B*T,)
            return F.cross_entropy(lg.view(-1, V), y, ignore_index=-1, reduction="none")

        with torch.no_grad() if gate_stage == 2 else nullcontext():
            # the last loop's logits are the forward's; earlier loops go through the coda and head
            ce_t = torch.stack([ce(self.logits(self.norm_f(self.run_coda(s)))) for s in states[:-1]] + [ce(logits)])
        if step_weights is not None:
            w = torch.as_tensor(step_weights, dtype=ce_t.dtype, device=ce_t.device)
            if w.numel() != M or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"step_weights needs {M} weights >= 0 with a positive sum, got {step_weights}")
            return (w @ (ce_t * valid).sum(1)) / (w.sum() * valid.sum())
        lam = torch.sigmoid(self.exit_gate(norm(torch.stack(states).detach() if gate_stage == 2 else torch.stack(states))))
        lam = lam.view(M, -1)  # λ_t per token
        if gate_stage == 1:
            survive = torch.cumprod(torch.cat([torch.ones_like(lam[:1]), 1 - lam[:-1]]), dim=0)  # Π_{j<t}(1-λ_j)
            p = torch.cat([lam[:-1] * survive[:-1], survive[-1:]])  # the last loop takes the rest
            entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(0)
            return (((p * ce_t).sum(0) - beta * entropy) * valid).sum() / valid.sum()
        # Ouro Eq. 5-6: I_t = max(0, CE_{t-1} - CE_t), what loop t gained, detached; the
        # gate after loop t learns to continue (1 - λ_t) where that gain was large:
        # (1/T) Σ_{t=2..T} mean_tokens BCE(1 - λ_t, σ(k (I_t - γ))), divided by T, not T-1, as written
        improve = (ce_t[:-1] - ce_t[1:]).clamp_min(0)
        target = torch.sigmoid(k * (improve - gamma))
        bce = F.binary_cross_entropy(1 - lam[1:], target, reduction="none")
        return (bce * valid).sum() / (valid.sum() * M)

    @torch.no_grad()
    def logits_at_budgets(self, idx, budgets, where=None):
        """Yields (M, logits) for several uniform budgets, one at a time (a batch's logits
        are large), for evaluation: logits (B, T, V), or (N, V) at the N positions where
        `where` (B, T) is True (a scored answer is a small part of a few-shot prompt). Loop
        i is the same computation whatever the budget, except under LoopFormer's modulation
        (its step size is 1/M), so one pass to the largest M reads every smaller budget off
        its intermediate state through the coda and head: exact, and sum(budgets) /
        max(budgets) times fewer loops than one forward per budget (tested equal to those)."""
        budgets = sorted(set(budgets))
        head = lambda h: self.logits(self.norm_f(h) if where is None else self.norm_f(h)[where])  # noqa: E731
        if self.config.modulation == "loopformer" or self.config.melt:  # (MELT: earlier chunks' K/V depend on M)
            for M in budgets:
                yield M, head(self.trunk(idx, self.steps(M)))
            return
        states = []
        h_last = self.trunk(idx, self.steps(budgets[-1]), states=states)
        for M in budgets:  # (MoR stops once no token is left in the loop: later budgets end in its last state)
            yield M, head(h_last if M == budgets[-1] else self.run_coda(states[min(M, len(states)) - 1]))

    @torch.no_grad()
    def residual_rms(self, idx, loops=None, routes=None):
        """FLT's stability diagnostic: RMS over features of each loop's output h_t,
        averaged over batch and sequence; one float per loop t = 1..M. routes: as in trunk."""
        states = []
        self.trunk(idx, self.steps(loops), states=states, routes=routes)
        return [s.float().pow(2).mean(-1).sqrt().mean().item() for s in states]

    # ---- generation --------------------------------------------------------------------

    def kv_cache_bytes(self, batch, loops, dtype=torch.float32, kv_sharing="none"):
        """What new_cache(loops, kv_sharing) will hold for `batch` rows: K and V at every slot
        (without sharing one per layer visit, the effective depth)."""
        cfg = self.config
        kind, N = ("last", 0) if cfg.melt else parse_kv_sharing(kv_sharing)  # (MELT's cache is always shared)
        groups = loops if kind == "none" else min(N, loops) if kind == "window" else 1
        slots = cfg.n_prelude + cfg.n_core * groups + cfg.n_coda
        return 2 * slots * batch * cfg.n_kv_head * cfg.block_size * (cfg.n_embd // cfg.n_head) * dtype.itemsize

    def activation_bytes(self, batch, seq_len, loops, dtype=torch.float32):
        """A rough estimate of what a training step keeps for backward: per token and block
        visit ~12 d-wide tensors and 3 of the MLP's width; truncated backprop keeps the last
        bptt_k loops, activation checkpointing one loop plus every loop's input."""
        cfg = self.config
        per_visit = batch * seq_len * (12 * cfg.n_embd + 3 * int(cfg.mlp_ratio * cfg.n_embd)) * dtype.itemsize
        grad_loops = min(loops, cfg.bptt_k) if cfg.bptt_k else loops
        if cfg.checkpoint_loops:
            visits = cfg.n_prelude + cfg.n_core + cfg.n_coda
            return visits * per_visit + grad_loops * batch * seq_len * cfg.n_embd * dtype.itemsize
        return (cfg.n_prelude + cfg.n_core * grad_loops + cfg.n_coda) * per_visit

    def new_cache(self, loops, kv_sharing="none"):
        """An empty KV cache for budget `loops`; kv_sharing (KVCache) shares the core's slots
        across loops: memory that does not grow with the budget, at the price of exactness."""
        cfg = self.config
        sharing = parse_kv_sharing(kv_sharing)
        if cfg.melt:  # MELT's cache is one slot per core layer, rewritten every loop, by construction
            if sharing[0] not in ("none", "last"):
                raise ValueError(f"kv_sharing={kv_sharing}: a melt=True model has its own shared cache")
            sharing = ("last", 0)
        if sharing[0] != "none" and cfg.routing == "mor":
            raise ValueError("kv_sharing with routing='mor': MoR's cache keeps its own per-recursion selections")
        layout = None if sharing[0] == "none" else (cfg.n_prelude, cfg.n_core, loops, sharing)
        return KVCache(cfg.n_prelude + cfg.n_core * loops + cfg.n_coda, cfg.block_size, layout)

    @torch.inference_mode()  # no autograd bookkeeping at all: measurably faster than no_grad
    def generate(self, idx, max_new_tokens, loops=None, temperature=1.0, top_k=None,
                 use_cache=True, generator=None, schedule=None, exit=None, min_loops=1, loops_used=None,
                 cuda_graph=True, kv_sharing="none"):
        """
        Sample max_new_tokens tokens after idx (B, T) at loop budget `loops` (or with
        the loop schedule `schedule`).
        temperature 0 means greedy. The context is cropped to the last block_size
        tokens. With use_cache the prompt is prefilled once and each new token runs one
        position through every (loop, layer); once the text outgrows block_size, each
        step rebuilds the cache from the cropped window (every position's K/V depends on
        the window it saw), so cached and uncached decoding stay identical.

        exit: per-token early exit while decoding, loops = the maximum:
        ("kl", 1e-3): KL(p_{t-1} || p_t) of the next-token distributions < threshold (Huginn);
        ("latent", 0.03): relative change ||h_t - h_{t-1}|| / ||h_t|| < threshold (Huginn);
        ("gate", 0.9): Ouro's gate, stop once the exit CDF reaches q (needs exit_gate);
        ("gate_all", 0.9): the same choice as Ouro's released code makes it: every loop
        runs (no compute saved, every K/V real), the exit picks which state reaches the head.
        No token stops before min_loops. The prompt runs at the full budget. loops_used, a
        list, receives the loops each decoded token ran (a list per step, one per row).

        routing='mor': each token's depth is its router's choice (see route). The cache
        keeps every recursion's router scores and selections, so a new token is ranked
        against the earlier tokens exactly as in the full forward, attends only to the
        tokens kept at each recursion, and leaves the loop (skipping the compute) once
        it is dropped; loops_used then receives the recursions each token got.

        cuda_graph: on a GPU, each cached step after the prompt is captured once as a CUDA
        graph and replayed (see graph_decode_step): the same arithmetic without launching
        ~2,000 small kernels from Python per token. Not for early exits, MoR or modulation.

        kv_sharing: 'none' (exact), or 'first' | 'last' | 'mean' | 'window:N', a cache whose
        core slots are shared across loops (KVCache): memory constant in the budget.
        """
        steps = self.steps(loops, schedule)
        sharing = "last" if self.config.melt else parse_kv_sharing(kv_sharing)[0]  # (MELT's cache is shared)
        if sharing != "none" and (exit is not None or not use_cache):
            raise ValueError(f"kv_sharing={kv_sharing} shares the KV cache: it needs use_cache=True and no exit")
        if exit is not None:
            check_exit(exit, self.config)
            if not use_cache:
                raise ValueError("early exit decodes with the KV cache: use_cache=True")
        bs, cfg = self.config.block_size, self.config
        graphed = (cuda_graph and use_cache and exit is None and idx.is_cuda and cfg.routing != "mor"
                   and cfg.modulation == "none" and sharing == "none")
        cache = replay = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -bs:], schedule=steps)
            elif cache is None or idx.size(1) > bs:
                cache = self.new_cache(len(steps), kv_sharing)
                logits, _ = self(idx[:, -bs:], schedule=steps, cache=cache)
                replay = None  # a graph holds its cache's buffers: past block_size each step fills a new cache
            elif graphed:
                replay = replay or self.graph_decode_step(steps, cache, idx[:, -1:])
                logits = replay(idx[:, -1:])
            elif exit is None:
                logits, _ = self(idx[:, -1:], schedule=steps, cache=cache)
                if loops_used is not None and cache.route_sel is not None:  # MoR: recursions this token got
                    loops_used.append(cache.route_sel[:, :, cache.pos - 1].sum(0).tolist())
            else:
                logits, used = self.decode_with_exit(idx[:, -1:], steps, cache, exit, min_loops)
                if loops_used is not None:
                    loops_used.append(used.tolist())
            logits = logits[:, -1, :]
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    def graph_decode_step(self, steps, cache, idx):
        """
        One decoding step (B, 1 tokens through every (loop, layer) of the schedule into the
        cache) captured as a CUDA graph; returns replay(idx) -> logits (B, 1, V). A looped
        model's step is the same few kernels over and over (72 block visits at M = 12 on 6
        layers), each too small to keep a GPU busy: launched one by one from Python, the
        launches are the time. Capture needs shapes that do not change, so the cache
        switches to static decoding: the position is a device tensor, each token is written
        at it and attends to the whole preallocated buffer under a mask. The same arithmetic
        as the eager step (tested on the CPU, where the static cache runs without a graph).
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
                self(static_idx, schedule=steps, cache=cache)  # writes this token's K/V at pos: harmless
                cache.pos = pos
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), autocast():
            static_logits, _ = self(static_idx, schedule=steps, cache=cache)
        cache.pos = pos

        def replay(idx):
            static_idx.copy_(idx)
            cache.pos_t.fill_(cache.pos)
            graph.replay()
            cache.advance(1)
            return static_logits.clone()
        return replay

    def decode_with_exit(self, idx, steps, cache, exit, min_loops):
        """
        One new token (B, 1) through the model, each row stopping after the first loop
        whose exit criterion fires. A row that stopped keeps its state, and the K/V of
        the loops it skipped are filled from its last computed loop for the same layer
        (Huginn's latest-m4), so later tokens attending to it find an entry in every
        (loop, layer) slot. exit kind 'gate_all' runs every loop instead and sends each
        row's exit state to the coda and head. Returns (logits (B, 1, V), loops used per row).
        """
        cfg, kind, threshold = self.config, exit[0], exit[1]
        B, pos, M = idx.size(0), cache.pos, len(steps)
        rope = (cache.rows(self.rope_cos, 1), cache.rows(self.rope_sin, 1))
        e, h = self.loop_input(idx, rope, cache)
        x = h  # the latent exit compares loop 1 with h_0 (Huginn code)
        first, coda_slot = cfg.n_prelude, cfg.n_prelude + cfg.n_core * M
        used = torch.full((B,), M, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        logp_prev = torch.full((B, cfg.vocab_size), -math.log(cfg.vocab_size), device=idx.device)  # p_0 uniform
        continue_prob = torch.ones(B, device=idx.device)  # gate: Π_{j<t} (1 - λ_j)
        for i, dt in enumerate(steps):
            x_new = self.core_pass(h, e, i, rope, cache, first + i * cfg.n_core, self.conditioning(i, math.fsum(steps[:i]), dt))
            update = x_new - x
            x_new = self.selective_update(x_new, x)
            if done.any() and kind != "gate_all":
                x_new = torch.where(done.view(-1, 1, 1), x, x_new)
                rows = done.nonzero().flatten()
                src = first + (used[rows] - 1) * cfg.n_core  # each stopped row's last computed loop
                for j in range(cfg.n_core):
                    cache.k[first + i * cfg.n_core + j, rows, :, pos] = cache.k[src + j, rows, :, pos]
                    cache.v[first + i * cfg.n_core + j, rows, :, pos] = cache.v[src + j, rows, :, pos]
            x_prev, x = x, x_new
            h = self.next_state(x)
            if i == M - 1:
                break
            if kind == "kl":  # the next-token distribution after this loop, through coda and head
                logp = F.log_softmax(self.logits(self.norm_f(self.run_coda(x, rope, cache, coda_slot)))[:, -1], dim=-1)
                kl = (logp_prev.exp() * (logp_prev - logp)).sum(-1)  # KL(p_{t-1} || p_t)
                logp_prev = logp
                fire = kl < threshold
            elif kind == "latent":
                fire = ((x - x_prev).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12))[:, -1] < threshold
            elif kind == "confidence":  # LoopUS: the head is sure enough this loop's prediction is right
                fire = torch.sigmoid(self.confidence_logit(update))[:, -1] > threshold
            else:  # gate, gate_all: p_t = λ_t Π_{j<t}(1 - λ_j); stop once Σ p_t >= q
                lam = torch.sigmoid(self.exit_gate(norm(x)))[:, -1, 0]
                continue_prob = continue_prob * (1 - lam)
                fire = 1 - continue_prob >= threshold
            newly = fire & ~done & (i + 1 >= min_loops)
            used = torch.where(newly, torch.full_like(used, i + 1), used)
            done = done | newly
            x_exit = torch.where(newly.view(-1, 1, 1), x, x if i == 0 else x_exit)  # gate_all: the chosen state
        if kind == "gate_all" and M > 1:
            x = torch.where(done.view(-1, 1, 1), x_exit, x)
        x = self.run_coda(x, rope, cache, coda_slot)  # every row's final state: the real coda K/V
        cache.advance(1)
        return self.logits(self.norm_f(x)), used

    # ---- bookkeeping ------------------------------------------------------------------

    def num_params(self):
        """Unique parameters (shared core weights and a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def effective_depth(self, loops=None):
        cfg = self.config
        M = cfg.n_loops if loops is None else loops
        return cfg.n_prelude + cfg.n_core * M + cfg.n_coda

    def flops_per_token(self, loops=None):
        """
        Training FLOPs per token (forward + backward) at budget M, PaLM-style:
        6 * (matmul weights visited per token) + 12 * depth * d * T for attention.
        A looped core counts once per loop: compute grows with M, parameters do not.
        With truncated backprop (bptt_k) the loops before the last k run forward only:
        2 FLOPs per weight instead of 6.
        """
        cfg = self.config
        M = cfg.n_loops if loops is None else loops
        per_block = sum(p.numel() for p in self.core[0].parameters())
        forward = 2 * per_block + 4 * cfg.n_embd * cfg.block_size  # one block's forward, per token
        no_grad_loops = max(0, M - cfg.bptt_k) if cfg.bptt_k else 0  # their backward is skipped
        return (3 * forward * self.effective_depth(M) - 2 * forward * cfg.n_core * no_grad_loops
                + 6 * cfg.n_embd * cfg.vocab_size)  # + lm_head

    def summary(self):
        cfg = self.config
        shape = f"{cfg.n_prelude} + {cfg.n_core}⊗{cfg.n_loops} + {cfg.n_coda}"
        flags = [f"injection={cfg.injection}"] + [f"{k}={getattr(cfg, k)}" for k, default in (
            ("modulation", "none"), ("state_init", "prelude"), ("norm_state", False), ("block_norm", "pre"),
            ("norm_gains", False), ("init", "nanochat"), ("window_pattern", "L"), ("exit_gate", False),
            ("lora_rank", 0), ("lora_targets", "q,v"), ("routing", "none"), ("bptt_k", 0), ("selective_gate", False),
            ("confidence_head", False), ("embed_norm", True), ("qkv_bias", False), ("melt", False))
            if getattr(cfg, k) != default]
        return (f"LoopGPT {shape} (prelude + core⊗loops + coda), d={cfg.n_embd}, {', '.join(flags)} | "
                f"{self.num_params() / 1e6:.2f}M unique params | effective depth {self.effective_depth()} | "
                f"{self.flops_per_token() / 1e6:.1f} MFLOPs/token (train, M={cfg.n_loops})")

    def configure_optimizer(self, weight_decay, learning_rate, betas, optimizer="adamw", muon_lr=0.02,
                            embedding_lr=0.0, head_lr=0.0, eps=1e-8):
        """
        AdamW, or optimizer='muon': Muon (MuonAdamW, at the end of this file) for the blocks' weight matrices (and
        Huginn's adapter), AdamW for embeddings, head, vectors and small side matrices, as
        nanochat and FLT train. embedding_lr / head_lr > 0 give wte / lm_head AdamW groups of
        their own at those rates (FLT's recipe); a tied matrix is the head, at head_lr. Every
        group has lr_scale: its peak lr over learning_rate, so one schedule drives them all.
        """
        # weight decay on matrices (linear layers, embeddings) only, never on vectors;
        # Parcae's recurrence parameters (A_log, dt_bias, B) are not decayed either:
        # decaying B towards 0 would cut the input out of the loop
        hidden, decay, no_decay, embedding, head = [], [], [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p is self.lm_head.weight and head_lr:  # checked first: a tied wte is this matrix
                head.append(p)
            elif name == "wte.weight" and embedding_lr and p is not self.lm_head.weight:
                embedding.append(p)
            elif optimizer == "muon" and p.dim() == 2 and name.split(".")[0] in ("prelude", "core", "coda", "adapter"):
                hidden.append(p)
            else:
                (decay if p.dim() >= 2 and not name.startswith("diag_") else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
                  {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
                  {"params": embedding, "weight_decay": weight_decay, "lr_scale": embedding_lr / learning_rate},
                  {"params": head, "weight_decay": weight_decay, "lr_scale": head_lr / learning_rate}]
        if optimizer == "muon":
            groups.append({"params": hidden, "weight_decay": weight_decay, "use_muon": True,
                           "lr_scale": muon_lr / learning_rate})
        groups = [dict(g, lr=learning_rate * g["lr_scale"]) for g in groups if g["params"]]
        if optimizer == "muon":
            return MuonAdamW(groups, betas=betas, eps=eps)  # (defined at the end of this file)
        # the fused kernel (one launch for all tensors) where the parameters are on a GPU,
        # decided from where they are, so it is never asked for where it does not exist. (A
        # CPU has one too, 6x faster than foreach here, but it rounds differently: every
        # CPU result in the README would move in its last digits, so CPUs keep foreach.)
        fused = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)


# ---- MELT's post-training: distillation from the looped model it was converted from ----------

def melt_distill_loss(student, teacher, idx, loops, lambda_attn=0.1, forward=None):
    """
    MELT's phase 2, attention-aligned distillation (arXiv 2605.07721): the frozen looped
    model it was converted from teaches it, L = KL(p_teacher || p_student) + lambda_attn *
    mean over every (layer, loop) visit of MSE(o_student, sg(o_teacher)), o the attention
    output (after its projection). The paper's weight is 0.1; the form of its KD term is not
    given: here the token-mean KL at temperature 1, and the MSE a mean over elements.
    forward: the student's forward (train.py passes its DDP wrapper), default student.
    """
    attention = lambda m: [a for a in m.modules() if isinstance(a, Attention)]  # noqa: E731
    pairs = list(zip(attention(student), attention(teacher)))
    for s, t in pairs:
        s.record, t.record = {}, {}
    try:
        with torch.no_grad():
            t_logits, _ = teacher(idx, loops=loops)
        s_logits, _ = (forward or student)(idx, loops=loops)
        kd = F.kl_div(F.log_softmax(s_logits, -1).flatten(0, 1), F.log_softmax(t_logits, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean")
        mse = [F.mse_loss(torch.cat(s.record[slot], dim=1), torch.cat(t.record[slot], dim=1))
               for s, t in pairs for slot in s.record]
    finally:
        for s, t in pairs:
            s.record = t.record = None
    return kd + lambda_attn * torch.stack(mse).mean()


# ---- uptraining: a looped model initialised from a plain one -----------------------------------

INIT_CORES = ("lower", "stepwise", "average")
LORA_MATRIX = {"q": lambda b: b.attn.q, "k": lambda b: b.attn.k, "v": lambda b: b.attn.v, "o": lambda b: b.attn.proj,
               "fc": lambda b: b.mlp.fc, "down": lambda b: b.mlp.proj}  # each LoRA target's layer in a Block


def unrolled_blocks(model):
    """The blocks `model` runs at its train budget, in order (prelude, core x n_loops, coda),
    when that is all it runs: a plain stack, or a loop without injection, norm or modulation
    between its passes. Otherwise a ValueError: such a model is not a stack of layers."""
    cfg = model.config
    looped = cfg.n_loops > 1
    if looped and (cfg.injection != "none" or cfg.norm_state or cfg.modulation != "none" or cfg.lora_rank
                   or cfg.state_init != "prelude" or cfg.routing != "none" or cfg.selective_gate):
        raise ValueError("init_from needs a source that is a plain stack of layers: n_loops=1, or a loop with "
                         "injection='none' and no norm_state, modulation, lora_rank, state_init, routing or "
                         "selective_gate")
    return list(model.prelude) + [block for _ in range(cfg.n_loops) for block in model.core] + list(model.coda)


@torch.no_grad()
def layer_similarity(model, idx):
    """Mean cosine similarity between each layer's input and output over the tokens of idx,
    for the layers unrolled_blocks lists: the representations' staged dynamics that LoopUS
    (Park et al. 2026) reads to split a pretrained model. Early and late layers change the
    state most (low similarity); a middle stretch of small refinements (high similarity) is
    what loops well. train.py prints it when converting, to help choose n_prelude and n_coda."""
    T = idx.size(1)
    rope = (model.rope_cos[:T], model.rope_sin[:T])
    x = model.wte(idx)
    x = norm(x) if model.config.embed_norm else x
    sims = []
    for block in unrolled_blocks(model):
        y = block(x, rope)
        sims.append(F.cosine_similarity(x.float(), y.float(), dim=-1).mean().item())
        x = y
    return sims


def init_from_source(target, source, init_core="average"):
    """
    Initialise the looped `target` from the pretrained `source` (both LoopGPT), as Relaxed
    Recursive Transformers (Bae et al. 2025, arXiv 2410.20672) convert a pretrained model.
    The source's layers S_0 .. S_{N-1} (unrolled_blocks) are split by the target's shape:
    the prelude takes the first P, the coda the last C, and the N - P - C between them are
    replaced by the core's K blocks looped T = (N - P - C) / K times, in order: loop t runs
    core block j where the source ran S_{P + Kt + j} (Relaxed's CYCLE sharing).
    init_core, what core block j starts as:
      lower     S_{P + j}: the first loop's layers, a contiguous block;
      stepwise  K layers evenly spaced over the replaced ones, the first and the last
                included (our reading of Relaxed's "Stepwise": layers at fixed intervals);
      average   the mean of the T layers it stands for, parameter by parameter
                (Relaxed's "Average").
    With lora_rank = r (and T = n_loops), loop t's LoRA on each of lora_targets starts at
    the best rank-r approximation of what the shared block misses, the truncated SVD of
    W(S_{P+Kt+j}) - W(core j) (Relaxed, Eq. 5): B = U_r S_r, A = V_r^T, so each loop's
    matrices start as close to the layer it replaces as rank r allows (exactly, at full
    rank; with lora_targets='all', as Relaxed does, the whole layer but its norm gains).
    The embedding, the final norm and the head are copied; the target's own extra
    parameters (an injection's adapter, gates) keep their init. A looped source of the
    target's own shape (prelude, core and coda sizes) is copied as it is instead, its new
    modules (e.g. MELT's gates, melt=True) keeping their init. Returns the squared
    Frobenius error of each LoRA-approximated matrix relative to the matrix it stands for
    ({name: [relative error per (loop, block)]}), empty without LoRA.
    """
    if init_core not in INIT_CORES:
        raise ValueError(f"init_core={init_core!r} (valid: {', '.join(INIT_CORES)})")
    cfg, sc = target.config, source.config
    shape = ("n_prelude", "n_core", "n_coda", "n_embd", "n_head", "n_kv_head", "mlp", "mlp_ratio", "vocab_size")
    if sc.n_loops > 1 and all(getattr(cfg, k) == getattr(sc, k) for k in shape):
        # the same loop: its weights as they are, the target's new modules (MELT's gates, an
        # exit gate, ...) keep their init; parameters the target lacks are an error
        missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
        if unexpected:
            raise ValueError(f"the source has parameters this model lacks ({', '.join(unexpected[:3])}): keep its flags")
        return {}
    layers = unrolled_blocks(source)
    P, K, C = cfg.n_prelude, cfg.n_core, cfg.n_coda
    middle = layers[P:len(layers) - C]
    if len(middle) < K or len(middle) % K:
        raise ValueError(f"the source runs {len(layers)} layers: {P} prelude + {C} coda leave {len(middle)} for a "
                         f"core of {K} blocks, which must be a positive multiple of {K}")
    T = len(middle) // K
    if cfg.lora_rank and T != cfg.n_loops:
        raise ValueError(f"lora_rank needs one loop per group of replaced layers: n_loops={cfg.n_loops}, but the "
                         f"source's {len(middle)} replaced layers make {T} loops of {K}")
    shape_keys = ("n_embd", "n_head", "n_kv_head", "mlp", "mlp_ratio", "norm_gains", "qk_norm", "block_norm", "qkv_bias",
                  "vocab_size", "tie_embeddings")
    differ = [f"{k}={getattr(source.config, k)!r} there, {getattr(cfg, k)!r} here" for k in shape_keys
              if getattr(cfg, k) != getattr(source.config, k)]
    if differ:
        raise ValueError(f"the source's layers do not fit this model ({'; '.join(differ)}): keep the source's values")
    with torch.no_grad():
        for dst, src in zip(list(target.prelude) + list(target.coda), layers[:P] + layers[len(layers) - C:]):
            dst.load_state_dict(src.state_dict())
        for j, block in enumerate(target.core):
            tied = [middle[K * t + j] for t in range(T)]
            if init_core == "lower":
                block.load_state_dict(tied[0].state_dict())
            elif init_core == "stepwise":
                block.load_state_dict(middle[round(j * (len(middle) - 1) / max(1, K - 1))].state_dict())
            else:
                states = [b.state_dict() for b in tied]
                block.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]})
        for name in ("wte", "lm_head", "norm_f"):
            getattr(target, name).load_state_dict(getattr(source, name).state_dict())
        errors = {}
        if cfg.lora_rank:
            r = cfg.lora_rank
            for which in lora_shapes(cfg):
                A, B, errs = getattr(target, f"lora_A_{which}"), getattr(target, f"lora_B_{which}"), []
                for t in range(T):
                    for j in range(K):
                        W = LORA_MATRIX[which](middle[K * t + j]).weight
                        R = W - LORA_MATRIX[which](target.core[j]).weight
                        U, S, Vh = torch.linalg.svd(R.float(), full_matrices=False)
                        k = min(r, S.numel())  # (a rank above the matrix's own leaves zero columns)
                        B[t, j].zero_()
                        A[t, j].zero_()
                        B[t, j, :, :k] = U[:, :k] * S[:k]
                        A[t, j, :k] = Vh[:k]
                        errs.append(float((S[r:] ** 2).sum() / W.float().pow(2).sum().clamp_min(1e-30)))
                errors[f"lora_{which}"] = errs
    return errors


def compile_blocks(model, **kwargs):
    """torch.compile every Block in place (train.py's compile=True). One compiled block
    serves every loop and every budget M: the loop itself is plain Python, so changing M
    triggers no recompile (tests/test_compile.py counts them)."""
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(**kwargs)
    return model


def sample_short_route(L, rng):
    """
    LoopFormer's random shortcut route on the 1/L grid: S ~ U{1..L-1} steps;
    each of the first S-1 steps draws its size from {1/L, 2/L, ...}, leaving at least 1/L
    for every step still to come; the last step takes the rest. rng: numpy Generator.
    """
    S = int(rng.integers(1, L))
    units, left = [], L
    for k in range(S - 1):
        u = int(rng.integers(1, left - (S - 1 - k) + 1))  # leave >= 1 unit per later step
        units.append(u)
        left -= u
    units.append(left)
    return [u / L for u in units]


def check_schedule(schedule, loops=None, modulation="loopformer"):
    """A schedule is a non-empty list of positive step sizes that sum to 1 (± 1e-6)."""
    try:
        steps = [float(s) for s in schedule]
    except (TypeError, ValueError):
        raise ValueError(f"a schedule is a list of step sizes, got {schedule!r}") from None
    if not steps or any(not (0 < s <= 1) for s in steps) or abs(math.fsum(steps) - 1) > 1e-6:
        raise ValueError(f"a schedule needs step sizes in (0, 1] that sum to 1, got {steps} (sum {math.fsum(steps)})")
    if loops is not None and loops != len(steps):
        raise ValueError(f"loops={loops} but the schedule has {len(steps)} steps")
    if modulation != "loopformer" and max(steps) - min(steps) > 1e-9:
        raise ValueError(f"a schedule with unequal steps needs modulation='loopformer' "
                         f"(this model has modulation={modulation!r}); use loops=M")
    return steps


def check_exit(exit, cfg):
    kinds = ("kl", "latent", "gate", "gate_all", "confidence")
    if not (isinstance(exit, (tuple, list)) and len(exit) == 2 and exit[0] in kinds):
        raise ValueError(f"exit must be (kind, threshold) with kind in {kinds}, got {exit!r}")
    gate = exit[0].startswith("gate") or exit[0] == "confidence"
    if not (isinstance(exit[1], (int, float)) and exit[1] > 0) or (gate and not exit[1] <= 1):
        raise ValueError(f"exit threshold must be > 0 (and <= 1 for gate), got {exit[1]!r}")
    if cfg.routing == "mor":
        raise ValueError("routing='mor' already chooses each token's depth: no exit criterion on top")
    if exit[0].startswith("gate") and not cfg.exit_gate:
        raise ValueError("exit=('gate', q) needs a model trained with exit_gate=True")
    if exit[0] == "confidence" and not cfg.confidence_head:
        raise ValueError("exit=('confidence', q) needs a model trained with confidence_head=True")


def parse_schedule(text, cfg):
    """A schedule typed as text: '3,2,2,1' in units of 1/L (integers summing to L = n_loops)
    or '0.5,0.25,0.25' as fractions summing to 1. Returns the checked step sizes."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"'{text}' is not a comma-separated list of numbers") from None
    L = cfg.n_loops
    if all(v.is_integer() for v in values) and sum(values) == L:
        values = [v / L for v in values]
    try:
        return check_schedule(values, modulation=cfg.modulation)
    except ValueError as e:
        raise ValueError(f"{e} (step sizes in units of 1/L summing to L={L}, or fractions summing to 1)") from None


def parse_exit(text, cfg):
    """An exit typed as text, 'kind:threshold' (e.g. 'kl:1e-3'), checked against the model."""
    kind, _, value = text.partition(":")
    try:
        exit = (kind, float(value))
        check_exit(exit, cfg)
    except ValueError as e:
        raise ValueError(f"{e}. Examples: kl:1e-3, latent:0.03, gate:0.9, gate_all:0.9, confidence:0.6") from None
    return exit


def per_sequence_problem(cfg):
    """Why per-sequence depths (Parcae) cannot run on this model, or None. A row's loops are
    not aligned with the batch's, so the loops must not depend on their index."""
    if cfg.routing == "mor":
        return "routing='mor' chooses each token's depth itself: no per-sequence depths"
    if cfg.modulation != "none" or cfg.lora_rank or (cfg.state_init == "prelude" and cfg.injection != "none"):
        return ("per-sequence depths need loops that do not depend on their index: no modulation or lora_rank, "
                "and a random or zero state_init unless injection='none'")
    return None


def check_loops(M):
    if isinstance(M, bool) or not isinstance(M, int) or M < 1:
        raise ValueError(f"loop budget must be an integer >= 1, got {M!r}")
    return M



# ---- checkpoints ----------------------------------------------------------------------------
# A checkpoint is a dict of tensors and plain values (model weights, model_config, the
# optimizer's state, train_config, data_meta with the tokenizer, iter_num): written
# atomically, read with weights_only=True, so a file cannot run code, and checked before use.
# Errors are ValueErrors with one readable line; the scripts print them and stop.

CHECKPOINT_VERSION = 2  # 2: MoR and Huginn's sandwich adapter follow their authors' code

def save_checkpoint(obj, path):
    """Write to a temp file, then rename: a crash mid-write never leaves a torn checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}; train one first, e.g.: python train.py "
                         f"--out_dir={os.path.dirname(path) or '.'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holds objects we never save
        raise ValueError(f"cannot read checkpoint {path} (corrupt or not a loopgpt checkpoint): "
                         f"{str(e).splitlines()[0]}") from None
    needed = ("version", "model", "model_config", "iter_num", "data_meta")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        raise ValueError(f"{path} is not a loopgpt checkpoint (needs keys: {', '.join(needed)})")
    if ckpt["version"] not in (1, CHECKPOINT_VERSION):
        raise ValueError(f"{path} has checkpoint version {ckpt['version']}, this code reads versions 1 and "
                         f"{CHECKPOINT_VERSION}")
    mc = ckpt["model_config"] if isinstance(ckpt["model_config"], dict) else {}
    if ckpt["version"] == 1 and (mc.get("routing") == "mor" or (mc.get("injection"), mc.get("block_norm")) == (
            "concat", "sandwich")):  # these models compute differently now: loading them would mislead
        what = "MoR routing" if mc.get("routing") == "mor" else "sandwich adapter"
        raise ValueError(f"{path} was saved by a loopgpt whose {what} did not yet follow its authors' code; "
                         f"it computes differently now: train it again")
    return ckpt


def model_from_checkpoint(ckpt, overrides=None):
    """Build the model the checkpoint describes (optionally with some config keys changed) and load it."""
    cfg_dict = dict(ckpt["model_config"])
    unknown = [k for k in cfg_dict if k not in {f.name for f in fields(LoopGPTConfig)}]
    if unknown:
        raise ValueError(f"checkpoint has model config keys this code does not know: {', '.join(unknown)}")
    cfg_dict.update(overrides or {})
    try:
        model = LoopGPT(LoopGPTConfig(**cfg_dict))
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"checkpoint does not fit the model config: {str(e).splitlines()[0]}") from None
    return model

# ---- Muon: the optimizer configure_optimizer builds for the blocks' matrices ----------------
# Muon (Jordan et al. 2024; used by nanochat and by the FLT paper's training): for each
# weight matrix, the update is the momentum of its gradient made (nearly) orthogonal, i.e.
# G = U S V^T is replaced by about U V^T, computed with a few Newton-Schulz iterations
# instead of an SVD. Every direction of the matrix then moves by the same amount, whatever
# the gradient's spectrum. Embeddings, the head and vectors are not hidden-layer matrices:
# they keep AdamW, in the same optimizer object (one state dict for checkpoints).
# Under DDP the gradients are averaged before step(), and this update is a deterministic
# function of the gradient and the optimizer state, so every rank computes the same update
# (the orthogonalisation is repeated on each rank rather than sharded, as nanochat does:
# simpler, and the cost is small next to a forward and backward pass).

# the quintic's coefficients from Muon: they push every singular value of the normalised
# matrix into about [0.7, 1.2] in 5 steps (fast, not exactly 1: Muon does not need exact)
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5):
    """About U V^T for G = U S V^T (2-D), by the quintic Newton-Schulz iteration
    X <- a X + (b A + c A^2) X, A = X X^T, from X = G / ||G||_F (so that ||X||_2 <= 1)."""
    a, b, c = NS_COEFFS
    # bf16 on GPU (as Muon does: fast and good enough); fp32 on CPU, where bf16 is slow
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(0) > X.size(1)
    if tall:  # iterate on the short side: A is min(rows, cols) square
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).to(G.dtype)


def muon_momentum(step, warmup, start=0.85, end=0.95):
    """Muon's momentum at `step`: linear from `start` to `end` over `warmup` steps, then
    `end` (FLT's and nanochat's schedule, warmup 300); warmup 0 = `end` throughout."""
    frac = min(step / warmup, 1.0) if warmup > 0 else 1.0
    return (1 - frac) * start + frac * end


class MuonAdamW(torch.optim.Optimizer):
    """
    One optimizer, two rules. Groups with use_muon=True: SGD momentum (Nesterov), the
    momentum orthogonalised, scaled by sqrt(max(1, rows / cols)) so a tall matrix's
    update has the RMS of a square one's, decoupled weight decay. Other groups: AdamW.
    """

    def __init__(self, groups, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, ns_steps=5):
        super().__init__(groups, dict(lr=0.0, weight_decay=0.0, use_muon=False, betas=betas, eps=eps,
                                      momentum=momentum, ns_steps=ns_steps))
        for group in self.param_groups:
            if group["use_muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon updates 2-D weight matrices only")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                p.mul_(1 - lr * wd)  # decoupled weight decay, as in AdamW
                if group["use_muon"]:
                    if not state:
                        state["momentum"] = torch.zeros_like(p)
                    # buf <- mu buf + g, update from g + mu buf. FLT's (nanochat's) Muon keeps
                    # an EMA instead: buf <- lerp(buf, g, 1 - mu), update from lerp(g, buf, mu).
                    # With mu constant, theirs is (1 - mu) times ours at every step, and
                    # Newton-Schulz first divides by the norm: the same orthogonalised update.
                    # (While mu warms up the two differ slightly in how past steps are weighted.)
                    buf, mu = state["momentum"], group["momentum"]
                    buf.mul_(mu).add_(p.grad)
                    update = orthogonalize(p.grad.add(buf, alpha=mu), group["ns_steps"])  # Nesterov
                    p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)
                    continue
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                beta1, beta2 = group["betas"]
                state["step"] += 1
                t = state["step"].item()
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
