"""
loopgpt: a looped (recurrent-depth, weight-tied) GPT in one file.

    tokens -> wte -> prelude (n_prelude blocks)
           -> core (n_core blocks, looped M times, the same weights every loop)
           -> coda (n_coda blocks) -> norm -> lm_head -> soft-capped logits

`k ⊗ L` means a k-block core looped L times; the effective depth is
n_prelude + k*M + n_coda at loop budget M, and the parameter count never depends on M
(per-loop LoRA is the one deliberate exception). A model trained at L = n_loops may be run
at any budget M >= 1, including M > L, or with a LoopFormer schedule of step sizes.

Read it in this order (README.md has the variant table with the papers, docs/model.md
the equations):

Part 1, a complete looped GPT, top to bottom:
- LoopGPTConfig: the model's flags (the extensions' flags last, each explained in its section).
- norm, RoPE, the exact KV cache (one slot per (loop, layer) visit) and `visible`, which
  says what attention may see (causal, sliding windows, a cached prefix).
- Attention, MLP, Block (pre-norm or Huginn's sandwich), ModulatedBlock (adaLN gates):
  the nanochat block: parameter-free RMSNorm, RoPE, QK-norm, optional GQA, ReLU² MLP, no
  biases, zero-initialised output projections.
- LoopGPT: core_pass is one loop, with every `injection` as one branch (search its flag
  value, e.g. `inj == "full_attn"`); conditioning is the `modulation`; trunk runs the loop
  over a schedule (truncated backprop, checkpointing); forward(idx, targets) returns the
  logits and the cross-entropy; chunked_loss, the same cross-entropy a chunk of tokens at a
  time, never holding the whole logits (ChunkedHeadLoss, for training); logits_at_budgets;
  generate with the exact KV cache.

Part 2, one section per paper's extension, each opening with its citation, its flags and
the hook in Part 1 it uses: Huginn, Parcae, Ouro, Mixture-of-Recursions, Relaxed Recursive
Transformers (per-loop LoRA, conversion from a plain model), LoopUS, MELT.

Appendix: FLOPs and summary, the optimizer (AdamW, Muon), the checkpoint format.

What lives elsewhere: the training objectives (per-step supervision, Ouro's gate losses,
LoopFormer's shortcut route, LoopUS's terms, MoR's auxiliary loss, MELT's distillation) in
train.py; the decoding engine (KV sharing across loops, the static cache and CUDA-graph
replay, per-token early exits) in sample.py; every evaluation sweep in eval.py.
"""

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ================================================================================================
# Part 1: a looped GPT
# ================================================================================================

INJECTIONS = ("none", "add", "concat", "diag", "attn_first", "full_res", "full_attn")
STATE_INITS = ("prelude", "randn", "randn_small", "zero")
BLOCK_NORMS = ("pre", "sandwich", "branch")
MODULATIONS = ("none", "tmlt", "loopformer")
MLPS = ("relu2", "gelu", "swiglu")
ROUTINGS = ("none", "mor")
INITS = ("nanochat", "huginn", "parcae", "loopformer")
LORA_TARGETS = ("q", "k", "v", "o", "fc", "down")  # attention q, k, v, output; MLP in (gate and up), out


@dataclass
class LoopGPTConfig:
    vocab_size: int = 2048     # token ids (the tokenizer's, padded: GPT-2's 50,257 -> 50,304)
    block_size: int = 256      # context length
    n_embd: int = 128          # d, the residual stream's width
    n_head: int = 4            # query heads
    n_kv_head: int = 0         # key/value heads for GQA; 0 means n_head (plain multi-head)
    head_dim: int = 0          # per-head width; 0 means n_embd // n_head (Nanbeige's looped model has 2x that)
    n_prelude: int = 1         # blocks run once before the loop
    n_core: int = 2            # k: blocks in the looped core
    n_coda: int = 1            # blocks run once after the loop
    n_loops: int = 4           # L: loops at train time, and the default budget M
    injection: str = "none"    # one of INJECTIONS: how h_{t-1} and the input enter loop t
    state_init: str = "prelude"  # one of STATE_INITS: h_0 = prelude output, random (Huginn, Parcae), or zero
    norm_state: bool = False   # pass h_t = norm(x_t) between loops, LTi adds the raw embedding (FLT code)
    block_norm: str = "pre"    # one of BLOCK_NORMS: pre-norm, Huginn's sandwich, Ouro's branch norms
    norm_gains: bool = False   # learnable RMSNorm gains (init 1) in the blocks and the final norm
    norm_eps: float = 0.0      # the blocks' and final RMSNorm's epsilon; 0 = torch's (the dtype's eps)
    embed_norm: bool = True    # norm the token embedding before the first block (nanochat; Llama does not)
    qkv_bias: bool = False     # biases on q, k, v (Qwen2); the output projections never have one
    qk_norm: bool = True       # RMSNorm on queries and keys after RoPE (nanochat, FLT, Parcae)
    window_pattern: str = "L"  # FLT's sliding windows: per core layer, tiled, L = full, S = block_size // 4
    init: str = "nanochat"     # one of INITS: the weights' initial scales (see init_weights)
    modulation: str = "none"   # one of MODULATIONS: condition each loop on its index or on (t, Δ)
    bptt_k: int = 0            # truncated backprop: only the last k loops get gradients; 0 = all
    checkpoint_loops: bool = False  # recompute each loop's activations in backward (memory)
    mlp: str = "relu2"         # one of MLPS
    mlp_ratio: float = 4.0     # MLP hidden width / n_embd (LoopFormer 2.5)
    tie_embeddings: bool = False  # the head is the token embedding's matrix
    softcap: float = 15.0      # logits = c * tanh(logits / c); 0 turns it off
    rope_base: float = 10000.0  # RoPE's theta
    # the extensions' flags (Part 2), each explained in its paper's section
    exit_gate: bool = False    # Ouro: the exit gate λ_t = σ(w·norm(h_t) + b) on every loop's state
    routing: str = "none"      # one of ROUTINGS: "mor" = Mixture-of-Recursions token routing
    router_scale: float = 0.1  # MoR's gate g = router_scale * σ(score)
    lora_rank: int = 0         # Relaxed Recursive: per-loop LoRA on the core's matrices; 0 = off
    lora_targets: str = "q,v"  # which: some of LORA_TARGETS, or "all" (Relaxed: every linear of the block)
    selective_gate: bool = False  # LoopUS: x_t = h + Ā ⊙ (f(h) - h), Ā from the loop's own update
    confidence_head: bool = False  # LoopUS: σ(w·LN(f(h) - h) + b), will this loop's prediction be right
    melt: bool = False         # MELT: the core's K/V from a gated per-layer latent, one cache slot per layer
    melt_chunk: int = 16       # MELT trains chunk by chunk: later chunks read earlier ones' shared K/V
    # what the released looped models need (Huginn, Parcae, Ouro sections; data/huggingface.py loads them)
    embed_scale: float = 1.0   # Huginn, Parcae: the token embedding times this (Huginn: sqrt(n_embd))
    coda_norm: bool = False    # Huginn: the final norm (same weights) also after the loop, before the coda
    loop_norm_f: bool = False  # Ouro: every loop's output through the final norm; the next loop, gate and head read it
    value_embeds: str = ""     # Parcae: blocks (0-based over prelude, core, coda) whose values add a gated token embedding
    qk_gains: bool = False     # Qwen3 (an uptraining source): per-head RMSNorm with gains on q and k, before RoPE

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        problems = []
        if self.head_dim == 0:
            if self.n_head >= 1 and self.n_embd % self.n_head:
                problems.append(f"n_embd={self.n_embd} must split into n_head={self.n_head} heads (or give head_dim)")
            self.head_dim = self.n_embd // max(self.n_head, 1)
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
        if self.head_dim < 2 or self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even and >= 2 (RoPE rotates pairs)")
        if not self.embed_scale > 0:
            problems.append(f"embed_scale={self.embed_scale} must be > 0")
        if self.block_norm == "branch" and (self.modulation != "none" or self.melt):
            problems.append("block_norm='branch' (Ouro) is for plain blocks: not with modulation or melt")
        if self.loop_norm_f and (self.n_coda or self.norm_state or self.injection != "none"):
            problems.append("loop_norm_f=True (Ouro) hands each loop's normed output on as the state: it needs "
                            "n_coda=0, no norm_state and injection='none'")
        try:
            blocks = [int(i) for i in self.value_embeds.split(",")] if self.value_embeds else []
        except ValueError:
            blocks = [-1]
        if any(not 0 <= i < self.n_prelude + self.n_core + self.n_coda for i in blocks) or len(set(blocks)) < len(blocks):
            problems.append(f"value_embeds={self.value_embeds!r}: distinct block indices in 0.."
                            f"{self.n_prelude + self.n_core + self.n_coda - 1}, comma-separated")
        elif blocks and (self.melt or self.routing != "none"):
            problems.append("value_embeds (Parcae) not with melt or routing")
        if self.qk_gains and self.qk_norm:
            problems.append("qk_gains=True (Qwen3) is the q/k norm, before RoPE: set qk_norm=False, not both")
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


def causal_mask(Tq, Tk, window, device):
    """(Tq, Tk) bool: the last Tq of Tk positions each see themselves and the keys before
    them (a cached prefix of Tk - Tq keys included), within `window` keys if window > 0."""
    q_pos = torch.arange(Tk - Tq, Tk, device=device).view(-1, 1)
    k_pos = torch.arange(Tk, device=device).view(1, -1)
    mask = k_pos <= q_pos
    return mask & (q_pos - k_pos < window) if window else mask


def visible(k, v, Tq, window):
    """What Tq new queries attend to: (keys, values, mask). The mask is None where
    scaled_dot_product_attention's own causal flag says it all (training or a prefill:
    Tq = Tk) or nothing is hidden (one new token, no window); a decoded token's window is
    the last `window` keys."""
    if window and Tq == 1:
        return k[:, :, -window:], v[:, :, -window:], None
    if not window and Tq in (1, k.size(2)):
        return k, v, None
    return k, v, causal_mask(Tq, k.size(2), window, k.device)


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


class KVCache:
    """
    Keys and values for generation, one slot per (loop, layer) visit: prelude layers,
    then core layer j at loop t (slot n_prelude + t * n_core + j), then coda layers. Each
    loop's attention reads the keys of the *same* loop, so a single cache shared by all
    loops would not reproduce the full forward (FLT's official code caches only the last
    loop). Buffers are preallocated to block_size so decoding never concatenates. (The
    decoding engine in sample.py adds caches that share slots across loops.)
    """

    def __init__(self, n_slots, max_len):
        self.n_slots, self.max_len = n_slots, max_len
        self.k = self.v = None
        self.pos = 0  # tokens already in the cache

    def rows(self, table, T):
        """The rows of a per-position table (RoPE, a fixed state noise) for the next T tokens."""
        return table[self.pos:self.pos + T]

    def update(self, slot, k, v, window=0):
        """Store the new tokens' K/V at `slot`; returns what attention reads (see visible)."""
        return visible(*self.store(slot, k, v), k.size(2), window)

    def store(self, slot, k, v):
        """Write K/V (B, H, T, hd) at the cache's position; returns all the slot holds so far."""
        if self.k is None:  # allocate on first use
            self.allocate(k)
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
        check_fits(2 * n * B * H * self.max_len * hd * dtype.itemsize,
                   f"the KV cache ({n} (loop, layer) slots x {B} rows x {self.max_len} positions)", k.device)
        self.k = k.new_zeros(n, B, H, self.max_len, hd, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def advance(self, T):
        """The forward over T new tokens is done."""
        self.pos += T

    def nbytes(self):
        """Bytes the K/V buffers hold (0 before the first update)."""
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


class Attention(nn.Module):
    def __init__(self, cfg, window=0):
        super().__init__()
        self.window = window  # > 0: each query sees itself and the window - 1 keys before it
        self.n_head, self.n_kv_head, self.qk_norm = cfg.n_head, cfg.n_kv_head, cfg.qk_norm
        self.head_dim = cfg.head_dim
        self.q = nn.Linear(cfg.n_embd, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, rope, cache=None, slot=0, xq=None):
        # xq: where the queries come from (default x). FLT / LTai take them from the
        # previous loop's state while keys and values come from the current stream.
        B, T, C = x.shape
        q, k, v = self.q(x if xq is None else xq), self.k(x), self.v(x)
        # q and k go through RoPE and QK-norm together: one rotation and one norm, not two
        # (half the small ops, which is what a decoding step's time goes to on a CPU)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        qk = torch.cat([q.view(B, T, self.n_head, self.head_dim), k], dim=2)
        qk = apply_rotary(qk.transpose(1, 2), *rope)
        q, k = (norm(qk) if self.qk_norm else qk).split([self.n_head, self.n_kv_head], dim=1)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        # the cache stores the new keys and hands back every key this step sees, and the mask
        k, v, mask = visible(k, v, T, self.window) if cache is None else cache.update(slot, k, v, self.window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T == k.size(2),
                                           enable_gqa=self.n_head != self.n_kv_head)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


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

    def forward(self, x):
        x = self.fc(x)
        if self.act == "swiglu":
            gate, value = x.chunk(2, dim=-1)
            x = F.silu(gate) * value
        else:
            x = ReLUSquared.apply(x) if self.act == "relu2" else F.gelu(x)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, cfg, window=0):
        super().__init__()
        self.attn = Attention(cfg, window)
        self.mlp = MLP(cfg)
        # pre-norm: norm_1 before attention, norm_2 before the MLP; sandwich (Huginn) also
        # norms the stream after each residual add: norm_3 after attention, norm_4 after the MLP
        # (Ouro's branch norms put those two on the branches instead: BranchNormBlock)
        d, gain, eps = cfg.n_embd, cfg.norm_gains, cfg.norm_eps
        self.norm_1, self.norm_2 = RMSNorm(d, gain, eps), RMSNorm(d, gain, eps)
        four = cfg.block_norm != "pre"
        self.norm_3, self.norm_4 = (RMSNorm(d, gain, eps), RMSNorm(d, gain, eps)) if four else (nn.Identity(),) * 2

    def forward(self, x, rope, cache=None, slot=0, xq=None, c=None):
        # xq: the queries' stream (FLT), normed like the block's own input; c: the loop's
        # conditioning, which only ModulatedBlock reads
        a = self.attn(self.norm_1(x), rope, cache, slot, None if xq is None else norm(xq))
        return self.tail(x, a)

    def tail(self, x, a):
        """The block after attention's output a: residual add, MLP, residual add (Huginn's
        sandwich norm bounds the stream after each add)."""
        x = self.norm_3(x + a)
        return self.norm_4(x + self.mlp(self.norm_2(x)))


class ModulatedBlock(Block):
    """
    A core block conditioned on its loop (modulation='tmlt' or 'loopformer'): adaLN-Zero
    without shift (LoopFormer, Jeddi et al. 2025): gate_attn, gate_mlp, scale_attn,
    scale_mlp = Linear(d, 4d)(SiLU(c)); x += gate_attn * Attn(norm(x) * (1 + scale_attn)),
    then the same for the MLP. Zero-initialised (init_weights), so at init the block is the
    identity whatever c is. DiT keeps biases here, and so do we.
    """

    def __init__(self, cfg, window=0):
        super().__init__(cfg, window)
        self.modulation = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)

    def forward(self, x, rope, cache=None, slot=0, xq=None, c=None):
        gate_attn, gate_mlp, scale_attn, scale_mlp = self.modulation(F.silu(c)).chunk(4, dim=-1)
        xq = None if xq is None else norm(xq)
        x = self.norm_3(x + gate_attn * self.attn(self.norm_1(x) * (1 + scale_attn), rope, cache, slot, xq))
        return self.norm_4(x + gate_mlp * self.mlp(self.norm_2(x) * (1 + scale_mlp)))


class TimestepEmbedder(nn.Module):
    """DiT's embedding of a scalar s: 256 sinusoidal features [cos(s ω_j), sin(s ω_j)],
    ω_j = exp(-ln(1e4) j / 128), then Linear(256, d) -> SiLU -> Linear(d, d)."""

    def __init__(self, d, n_freq=256):
        super().__init__()
        self.fc1 = nn.Linear(n_freq, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, s):
        n = self.fc1.in_features // 2
        args = s * torch.exp(-math.log(1e4) * torch.arange(n, device=s.device) / n)
        return self.fc2(F.silu(self.fc1(torch.cat([args.cos(), args.sin()]))))


class ChunkedHeadLoss(torch.autograd.Function):
    """
    The head, the soft-cap and the mean cross-entropy over the targets that are not -1, as one
    op that never holds the (N, V) logits nor their gradient: LoopGPT.chunked_loss, the same
    number as F.cross_entropy(model.logits(h), targets, ignore_index=-1) to float precision
    (tested). At flt_small's 32 x 1024 tokens and GPT-2's 50,304 ids the float32 logits alone
    are 6.6 GB, and autograd keeps several such tensors (the tanh, the log-softmax) plus their
    gradients; here the largest tensors are a few (rows, V) ones, one chunk at a time.

    forward: per chunk of `rows` rows, z = c tanh((h W^T) / c) in float32 (the matmul in
    `dtype`, as lm_head runs under autocast), CE_i = logsumexp(z_i) - z_{i, y_i}; it keeps
    only the N logsumexps. backward: per chunk, z is recomputed (one more head matmul) and
    dCE_i / dz_i = softmax(z_i) - onehot(y_i), times the soft-cap's derivative
    1 - tanh²(raw / c), times the incoming gradient / the number of targets; then
    grad_h = g W and grad_W += g^T h (accumulated in float32).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, softcap, rows, dtype):
        w = weight.to(dtype)
        lse = torch.empty(len(h), dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, len(h), rows):
            z = F.linear(h[s:s + rows].to(dtype), w).float()
            if softcap > 0:
                z = z.div_(softcap).tanh_().mul_(softcap)  # as logits(): c * tanh(z / c)
            y = targets[s:s + rows]
            lse[s:s + rows] = torch.logsumexp(z, dim=-1)
            ce = lse[s:s + rows] - z.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
            total += torch.where(y != -1, ce, 0.0).sum()
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.softcap, ctx.rows, ctx.dtype = softcap, rows, dtype
        return total / (targets != -1).sum()  # (no targets at all: nan, as F.cross_entropy)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, weight, targets, lse = ctx.saved_tensors
        softcap, rows, dtype = ctx.softcap, ctx.rows, ctx.dtype
        w = weight.to(dtype)
        per_target = grad / (targets != -1).sum()  # d loss / d CE_i for every counted row
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, len(h), rows):
            h_c, y = h[s:s + rows].to(dtype), targets[s:s + rows]
            t = F.linear(h_c, w).float()
            if softcap > 0:
                t = t.div_(softcap).tanh_()  # tanh(raw / c): z = c t, dz / d raw = 1 - t²
            g = (t * softcap if softcap > 0 else t).sub_(lse[s:s + rows, None]).exp_()  # softmax(z)
            g[torch.arange(len(y), device=g.device), y.clamp_min(0)] -= 1  # - onehot(y)
            g.mul_(torch.where(y != -1, per_target, 0.0)[:, None])
            if softcap > 0:
                g.mul_(t.square_().neg_().add_(1))
            g = g.to(dtype)
            if grad_h is not None:
                grad_h[s:s + rows] = g @ w
            if grad_w is not None:
                grad_w += (g.t() @ h_c).float()
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


class LoopGPT(nn.Module):
    def __init__(self, cfg: LoopGPTConfig):
        super().__init__()
        self.config = cfg
        d = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, d)
        block = BranchNormBlock if cfg.block_norm == "branch" else Block  # (Ouro's, in its section)
        self.prelude = nn.ModuleList(block(cfg) for _ in range(cfg.n_prelude))
        # FLT's sliding windows: core layer j is short (a quarter of the context) if the
        # pattern, tiled over the core, says S there; the last core layer always sees everything
        pattern, short = cfg.window_pattern, max(1, cfg.block_size // 4)
        windows = [short if pattern[j % len(pattern)] == "S" and j < cfg.n_core - 1 else 0 for j in range(cfg.n_core)]
        core_block = MeltBlock if cfg.melt else ModulatedBlock if cfg.modulation != "none" else block
        self.core = nn.ModuleList(core_block(cfg, w) for w in windows)  # looped, weight-tied
        self.coda = nn.ModuleList(block(cfg) for _ in range(cfg.n_coda))
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
            self.diag_norm = RMSNorm(d, cfg.norm_gains, cfg.norm_eps)
            self.diag_C = nn.Linear(d, d, bias=False)
        add_extensions(self)  # Part 2: LoRA, MoR's router, Ouro's gate, LoopUS's gate and head
        if cfg.modulation == "tmlt":  # embeds the loop index i (LoopFormer's TMLT baseline)
            self.time_embed = TimestepEmbedder(d)
        if cfg.modulation == "loopformer":  # embeds the normalised time t and the step size Δ
            self.time_embed = TimestepEmbedder(d)
            self.step_embed = TimestepEmbedder(d)
        self.init_buffers()
        self.init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def init_buffers(self, device=None):
        """The tables that are a function of the config, recomputed rather than saved: RoPE's,
        and the fixed random state used at inference (see initial_state). (A model built on
        the meta device, to load weights into, calls it again on a real one.)"""
        cfg = self.config
        d = cfg.n_embd
        check_fits(3 * 4 * cfg.block_size * (2 * cfg.head_dim + (d if cfg.state_init.startswith("randn") else 0)),
                   f"block_size={cfg.block_size} (its position tables, with their temporaries)")
        cos, sin = rotary_table(cfg.block_size, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        if cfg.state_init.startswith("randn"):
            noise = self.random_state(cfg.block_size, torch.Generator().manual_seed(0), device="cpu")
            self.register_buffer("state_noise", noise.to(device), persistent=False)

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
        The extensions' parameters are initialised in their sections (init_extensions).
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
        init_extensions(self)
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

    def num_params(self):
        """Unique parameters (shared core weights and a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def effective_depth(self, loops=None):
        cfg = self.config
        M = cfg.n_loops if loops is None else loops
        return cfg.n_prelude + cfg.n_core * M + cfg.n_coda

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

    def loop_input(self, idx, rope, cache):
        """Embedding and prelude: returns the loop input e and the initial state h_0."""
        emb = self.wte(idx)
        if self.config.embed_scale != 1:  # Huginn's sqrt(d), Parcae's embedding scale (released models)
            emb = emb * self.config.embed_scale
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

    def core_pass(self, h, e, t, rope, cache, slot, c=None):
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
            x = block(x, rope, cache, slot + j, xq, c)
        return x

    def parcae_decay(self):
        """Parcae's (Ā, Δ): Δ = softplus(dt_bias) > 0 and Ā = exp(-Δ ⊙ exp(A_log)) in (0, 1)."""
        dt = F.softplus(self.diag_dt_bias)
        return torch.exp(-dt * torch.exp(self.diag_A_log)), dt

    def next_state(self, x):
        """h_t, what loop t+1 reads of loop t's output x_t: the raw stream (Saunshi et al.,
        LoopFormer's Base-Loop), or norm(x_t) (FLT code: always for its FLT / FLTres / LTai,
        with norm_state for LT and LTi)."""
        if self.config.loop_norm_f:  # Ouro's released code: the final norm, with its gain (its section)
            return self.norm_f(x)
        if self.config.norm_state or self.config.injection in ("attn_first", "full_res", "full_attn"):
            return norm(x)
        return x

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

    def trunk(self, idx, steps, cache=None, record=None, depths=None):
        """
        Everything up to the final norm for the schedule `steps`: returns the coda's output
        (B, T, d). record, a dict, receives what the training objectives and diagnostics read
        of the loop: record["states"], each loop's output (and, per extension, MoR's routes,
        LoopUS's updates). depths (B,): Parcae's per-sequence depth (see its section).
        """
        cfg = self.config
        B, T = idx.shape
        if cfg.melt and (cache is None or T > cfg.melt_chunk):  # MELT runs chunk by chunk (its section)
            return melt_chunks(self, idx, steps, cache, record)
        pos = 0 if cache is None else cache.pos
        if pos + T > cfg.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds block_size={cfg.block_size}")
        rope = (self.rope_cos[:T], self.rope_sin[:T]) if cache is None else \
            (cache.rows(self.rope_cos, T), cache.rows(self.rope_sin, T))
        e, h = self.loop_input(idx, rope, cache)
        x = h  # the last loop's output; h_0 before the first
        slot = cfg.n_prelude  # KV-cache slot of the next (loop, layer) visit
        M = len(steps)
        router = Router(self, cache, pos, record) if cfg.routing == "mor" else None  # MoR (its section)
        depth = SequenceDepths(depths, M, cfg.bptt_k) if depths is not None else None  # Parcae (its section)
        for i, dt in enumerate(steps):
            c = self.conditioning(i, math.fsum(steps[:i]), dt)
            # truncated backprop through depth (Huginn): loops before the last bptt_k run
            # without a graph; e still gets gradients through the later loops' injection
            truncated = cfg.bptt_k > 0 and i < M - cfg.bptt_k
            with torch.no_grad() if truncated else nullcontext():
                if router is None:
                    x_new = self.run_core(h, e, i, rope, cache, slot, c)
                else:  # MoR: the router's tokens run the loop
                    x_new = router.recursion(x, h, e, i, rope, slot)
                    if x_new is None:
                        break  # no token is left in the loop
                if cfg.selective_gate or cfg.confidence_head:  # LoopUS (its section)
                    x_new = loopus_update(self, x_new, x, record)
            if depth is not None:
                x_new = depth.keep(i, truncated, x_new, x)
            x = x_new
            slot += cfg.n_core
            if record is not None:
                record.setdefault("states", []).append(x)
            h = self.next_state(x)
        x = self.run_coda(x, rope, cache, cfg.n_prelude + cfg.n_core * M)  # (a MoR loop may have stopped early)
        if cache is not None:
            cache.advance(T)
        return x

    def run_core(self, h, e, t, rope, cache, slot, c):
        """core_pass; in training with checkpoint_loops only each loop's input is kept, and
        the loop's activations are recomputed in backward (a KV cache is for inference)."""
        if self.config.checkpoint_loops and torch.is_grad_enabled() and not isinstance(cache, KVCache):
            return checkpoint(self.core_pass, h, e, t, rope, cache, slot, c, use_reentrant=False)
        return self.core_pass(h, e, t, rope, cache, slot, c)

    def run_coda(self, x, rope=None, cache=None, slot=0):
        if rope is None:  # another loop's state in training: positions start at 0
            rope = (self.rope_cos[:x.size(1)], self.rope_sin[:x.size(1)])
        if self.config.injection == "diag":  # Parcae: C maps the recurrent state back to the stream
            x = self.diag_C(x)
        if self.config.coda_norm:  # Huginn's released code norms the loop's output with ln_f here too
            x = self.norm_f(x)
        for block in self.coda:
            x = block(x, rope, cache, slot)
            slot += 1
        return x

    def logits(self, h):
        logits = self.lm_head(h).float()
        if self.config.softcap > 0:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        return logits

    def chunked_loss(self, h, targets, rows):
        """F.cross_entropy(self.logits(h), targets, ignore_index=-1) for h (..., d) after norm_f,
        computed `rows` rows at a time (ChunkedHeadLoss): the logits are never whole. Under
        autocast the head's matmul runs in the autocast dtype, as lm_head's does."""
        if rows < 1:
            raise ValueError(f"rows per chunk of the loss must be >= 1, got {rows}")
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.lm_head.weight.dtype
        return ChunkedHeadLoss.apply(h.reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                     self.config.softcap, rows, dtype)

    def forward(self, idx, targets=None, loops=None, schedule=None, cache=None):
        """
        idx (B, T) token ids; targets (B, T) or None (-1 = ignored position); loops = budget
        M (default n_loops, any M >= 1) or schedule = step sizes summing to 1
        (modulation='loopformer'); cache = a KVCache (new_cache) for generation.
        Returns (logits (B, T, V) in float32, the cross-entropy or None). The papers' other
        training losses read the loop's states through trunk: see train.py's objectives.
        """
        logits = self.logits(self.norm_f(self.trunk(idx, self.steps(loops, schedule), cache)))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

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
        record = {}
        h_last = self.trunk(idx, self.steps(budgets[-1]), record=record)
        states = record["states"]
        for M in budgets:  # (MoR stops once no token is left in the loop: later budgets end in its last state)
            yield M, head(h_last if M == budgets[-1] else self.run_coda(states[min(M, len(states)) - 1]))

    # ---- generation --------------------------------------------------------------------

    def new_cache(self, loops):
        """An empty exact KV cache for budget `loops`: one slot per (loop, layer) visit
        (MoR's also keeps its routing, MELT's is one slot per core layer: their sections)."""
        cfg = self.config
        if cfg.melt:
            return melt_cache(self, loops)
        return (MoRCache if cfg.routing == "mor" else KVCache)(self.effective_depth(loops), cfg.block_size)

    @torch.inference_mode()  # no autograd bookkeeping at all: measurably faster than no_grad
    def generate(self, idx, max_new_tokens, loops=None, schedule=None, temperature=1.0, top_k=None,
                 use_cache=True, generator=None):
        """
        Sample max_new_tokens tokens after idx (B, T) at loop budget `loops` (or with the
        schedule `schedule`); temperature 0 means greedy. The context is cropped to the last
        block_size tokens. With use_cache the prompt is prefilled once and each new token
        runs one position through every (loop, layer); once the text outgrows block_size,
        each step rebuilds the cache from the cropped window (every position's K/V depends
        on the window it saw), so cached and uncached decoding stay identical. (sample.py's
        engine adds early exits, KV sharing across loops and CUDA graphs.)
        """
        steps, bs = self.steps(loops, schedule), self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -bs:], schedule=steps)
            elif cache is None or idx.size(1) > bs:
                cache = self.new_cache(len(steps))
                logits, _ = self(idx[:, -bs:], schedule=steps, cache=cache)
            else:
                logits, _ = self(idx[:, -1:], schedule=steps, cache=cache)
            idx = torch.cat((idx, sample_next(logits[:, -1, :], temperature, top_k, generator)), dim=1)
        return idx


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """The next token (B, 1) from the last position's logits (B, V): greedy at temperature
    0, else a draw from softmax(logits / temperature), restricted to the top_k if given."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


def check_loops(M):
    if isinstance(M, bool) or not isinstance(M, int) or M < 1:
        raise ValueError(f"loop budget must be an integer >= 1, got {M!r}")
    return M


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


# ================================================================================================
# Part 2: the papers' extensions. Each section opens with its citation, its flags and the hook
# in Part 1 it uses. Their parameters are made and initialised here, in this order (the order
# of the random draws, so a seed gives the same model as it always has):
# ================================================================================================

def add_extensions(model):
    """LoopGPT.__init__'s hook: the extensions' parameters (MELT's gates live in its blocks)."""
    cfg, d = model.config, model.config.n_embd
    if cfg.lora_rank:  # Relaxed Recursive Transformers: per-loop LoRA inside the core's blocks
        add_lora(model)
    if cfg.routing == "mor":  # Mixture-of-Recursions: one router score per recursion, per token
        model.router = nn.Linear(d, cfg.n_loops, bias=False)
    if cfg.exit_gate:  # Ouro: after each loop, the probability of stopping there, per token
        model.exit_gate = nn.Linear(d, 1)
    if cfg.selective_gate:  # LoopUS: per-token, per-channel step size Δ from the loop's update
        model.gate_down = nn.Linear(d, math.ceil(d / 16), bias=False)
        model.gate_up = nn.Linear(math.ceil(d / 16), d)
        model.gate_A_log = nn.Parameter(torch.zeros(d))
    if cfg.confidence_head:  # LoopUS: a LayerNorm and a linear read of the loop's update
        model.confidence_norm = nn.LayerNorm(d)
        model.confidence = nn.Linear(d, 1)
    if cfg.melt:
        model.melt_alpha = 1.0  # MELT's phase-1 interpolation (train.py sets it; 1 = MELT itself)
    if cfg.value_embeds:  # Parcae: gated token embeddings added to some blocks' values
        add_value_embeddings(model)
    if cfg.qk_gains:  # Qwen3 as an uptraining source: gained per-head norms on q and k
        add_qk_gains(model)


@torch.no_grad()
def init_extensions(model):
    """init_weights' hook: the extensions' initial values."""
    cfg = model.config
    if cfg.lora_rank:
        init_lora(model)
    if cfg.routing == "mor":  # N(0, 0.02) as in the MoR code
        nn.init.normal_(model.router.weight, std=0.02)
    if cfg.melt:
        # MELT: z = σ(-4) ≈ 0.02 whatever the input, so a looped model converted to MELT
        # starts as itself with each token's last-loop K/V shared (as sample.py's
        # kv_sharing='last'); the paper gives no init (our choice)
        for block in model.core:
            block.melt_gate.weight.zero_()
            block.melt_gate.bias.fill_(-4.0)
    if cfg.selective_gate:
        # LoopUS code (Mamba's): A_log = log(1..d), so channel i decays at rate i; the step
        # size starts log-uniform in [0.001, 0.1] per channel (the bias is its softplus⁻¹)
        r = model.gate_down.out_features
        nn.init.uniform_(model.gate_down.weight, -cfg.n_embd ** -0.5, cfg.n_embd ** -0.5)
        nn.init.uniform_(model.gate_up.weight, -r ** -0.5, r ** -0.5)
        dt = torch.exp(torch.empty(cfg.n_embd).uniform_(math.log(1e-3), math.log(0.1))).clamp_min(1e-4)
        model.gate_up.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        model.gate_A_log.copy_(torch.log(torch.arange(1, cfg.n_embd + 1, dtype=torch.float32)))
    if cfg.confidence_head:
        nn.init.normal_(model.confidence.weight, std=cfg.n_embd ** -0.5)
        nn.init.zeros_(model.confidence.bias)
    if cfg.value_embeds:  # our choice: tables at the embedding's small scale, gates 2σ(0) = 1
        for i, table in model.value_embeds.items():
            nn.init.normal_(table.weight, std=math.sqrt(2 / (5 * cfg.n_embd)))
            nn.init.zeros_([*model.prelude, *model.core, *model.coda][int(i)].attn.v.ve_gate.weight)


# ---- Huginn (Geiping et al. 2025, arXiv 2502.05171) --------------------------------------------
# "Scaling up test-time compute with latent reasoning": a 2 + 4⊗r̄ + 2 model whose loop input
# is an adapter W_a [h_{t-1}; e] (injection='concat', a branch of core_pass), sandwich blocks
# (block_norm='sandwich', Block.tail), a random initial state (state_init='randn',
# initial_state) and Takase's small init (init='huginn'). It needs no hook of its own: its
# training samples the depth per step, Poisson(e^τ) + 1 with truncated backprop (train.py's
# loop_sampling='poisson_lognormal', bptt_k in trunk), and its per-token exits (KL between
# consecutive loops' predictions, the latent's relative change) are sample.py's
# decode_with_exit, with its compressed cache (kv_sharing='window:N').
#
# The released Huginn-0125 (data/huggingface.py loads it) needs three more flags, read from
# its modeling code: embed_scale = sqrt(d) (the embedding, and its random state, are scaled
# by sqrt(d); loop_input), coda_norm (its ln_f norms the loop's output before the coda as
# well as after it; run_coda), and q/k biases added before RoPE, which the loader puts in
# qkv_bias with a zero value bias (the same function). Its RoPE rotates adjacent pairs of a
# head's dimensions where ours rotates (i, i + hd/2): the loader permutes q's and k's rows
# per head, which leaves every attention score unchanged.


# ---- Parcae (Prairie et al. 2026, arXiv 2604.12946) --------------------------------------------
# The stable diagonal recurrence around the core is injection='diag' (core_pass, run_coda's C).
# This section is its value embeddings (flag value_embeds, used by the released models) and
# its per-sequence depth (train.py's loop_sampling='per_sequence'): every row of a batch runs
# its own number of loops. Hooks: add_extensions, trunk(depths=...). (Its MLP's 0.5 relu(x)²
# is relu2 with the 0.5 folded into the output projection by the loader: exact, a power of 2.)

def add_value_embeddings(model):
    """
    Parcae's value embeddings (its code, after modded-nanogpt): block i of value_embeds adds
    a token embedding to its attention values, gated per key/value head by the first 32
    channels of the block's normed input x: v += 2 σ(W_g x[..., :32]) ⊙ VE_i[ids]. The core's
    blocks use their own table every loop. Hooks: a forward hook on wte looks each table up
    for the current tokens, and one on the block's attn.v adds the gated rows.
    """
    cfg = model.config
    blocks = [*model.prelude, *model.core, *model.coda]
    model.value_embeds = nn.ModuleDict({i: nn.Embedding(cfg.vocab_size, cfg.n_kv_head * cfg.head_dim)
                                        for i in cfg.value_embeds.split(",")})
    model.wte.value_embeds = []  # (table, the attn.v it feeds): a plain list, not more parameters
    for i, table in model.value_embeds.items():
        v = blocks[int(i)].attn.v
        v.ve_gate = nn.Linear(min(32, cfg.n_embd), cfg.n_kv_head, bias=False)
        v.ve = None  # this forward's rows (B, T, kv heads * head_dim)
        v.register_forward_hook(add_value_embedding)
        model.wte.value_embeds.append((table, v))
    model.wte.register_forward_hook(look_up_value_embeddings)


def look_up_value_embeddings(wte, args, out):
    for table, v in wte.value_embeds:
        v.ve = table(args[0])


def add_value_embedding(v, args, out):
    if v.ve is None:  # (K/V recomputed outside a forward: no token ids)
        return out
    x = args[0]
    gate = 2 * torch.sigmoid(v.ve_gate(x[..., :v.ve_gate.in_features]))  # (B, T, kv heads)
    return out + (gate.unsqueeze(-1) * v.ve.unflatten(-1, (gate.size(-1), -1))).flatten(-2)


class SequenceDepths:
    """
    Parcae's per-sequence depth with truncated backprop (Parcae code): row b runs
    n_b = d_b - min(d_b, k) loops without gradient, then min(d_b, k) with, so every row
    sends gradient through the core, however shallow. The batch runs max(n_b) gradient-free
    loops, then max min(d_b, k) with gradient; a row takes part in the first n_b of the one
    and the first min(d_b, k) of the other, and keeps its state outside them.
    """

    def __init__(self, depths, M, bptt_k):
        self.n_grad = depths.clamp(max=bptt_k or M).view(-1, 1, 1)
        self.n_free = depths.view(-1, 1, 1) - self.n_grad
        self.grad_from = max(0, M - bptt_k) if bptt_k else 0  # the first loop with gradient

    def keep(self, i, truncated, x_new, x):
        """Loop i's output for the rows inside their loops, the previous state for the others."""
        inside = i < self.n_free if truncated else i - self.grad_from < self.n_grad
        return torch.where(inside, x_new, x)


def per_sequence_problem(cfg):
    """Why per-sequence depths cannot run on this model, or None. A row's loops are not
    aligned with the batch's, so the loops must not depend on their index."""
    if cfg.routing == "mor":
        return "routing='mor' chooses each token's depth itself: no per-sequence depths"
    if cfg.melt:
        return "melt=True runs chunk by chunk: no per-sequence depths"
    if cfg.modulation != "none" or cfg.lora_rank or (cfg.state_init == "prelude" and cfg.injection != "none"):
        return ("per-sequence depths need loops that do not depend on their index: no modulation or lora_rank, "
                "and a random or zero state_init unless injection='none'")
    return None


# ---- Ouro (Zhu et al. 2025, arXiv 2510.25741) --------------------------------------------------
# "Scaling latent reasoning via looped language models". Flag exit_gate=True: after every
# loop a gate reads the state, λ_t = σ(w · norm(h_t) + b), the probability of stopping there;
# p_t = λ_t Π_{j<t}(1 - λ_j). Its official model also norms every loop's output with the
# final norm and feeds that on (norm_state=True). The gate's two training stages are
# train.py's gate_stage; the exits at decoding (stop once the CDF of p reaches q, or Ouro's
# released all-loops choice) are sample.py's exit='gate' / 'gate_all'. Hook: none (a head
# on the states trunk records).
#
# The released Ouro models (data/huggingface.py loads them) differ in two ways, each a flag:
# loop_norm_f, the final norm with its learned gain is what each loop hands on, to the next
# loop, the gate and the head (LoopGPT.next_state); block_norm='branch', four norms per
# block, two of them on the attention's and the MLP's outputs before each residual add.

def exit_probability(model, x):
    """Ouro's λ_t for states x (..., d): (..., 1)."""
    return torch.sigmoid(model.exit_gate(model.norm_f(x) if model.config.loop_norm_f else norm(x)))


class BranchNormBlock(Block):
    """block_norm='branch' (Ouro's released code): x += norm_3(Attn(norm_1(x))), then
    x += norm_4(MLP(norm_2(x))): the branch outputs are normed, the stream is not."""

    def tail(self, x, a):
        x = x + self.norm_3(a)
        return x + self.norm_4(self.mlp(self.norm_2(x)))


# ---- Mixture-of-Recursions (Bae et al. 2025, arXiv 2507.10524) ----------------------------------
# Flags routing='mor', router_scale. A router picks, per recursion, which tokens go on
# looping; the others leave with their state. Hooks: trunk builds a Router, whose recursion()
# replaces the plain loop; attention sees only the kept keys through a KeyMask, a view of
# the cache; new_cache makes a MoRCache, which also stores the router's choices.

class Router:
    """One forward's routing state: the tokens still in the loop, and where their choices go."""

    def __init__(self, model, cache, pos, record):
        self.model, self.cache, self.pos, self.record = model, cache, pos, record
        self.sel = None  # the tokens kept at the last recursion

    def recursion(self, x, h, e, i, rope, slot):
        """Recursion i: route, run the core over the kept tokens' keys, and give each kept
        token h + g f(h) (MoR code: f the core with its residuals, i.e. (1 + g) h + g Δ(h));
        the others keep h. None once no token is left (deeper recursions change nothing)."""
        cand = self.sel if self.sel is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        self.sel, gate, score, key_mask = route(self.model, x, i, cand, self.cache, self.pos)
        if self.record is not None:
            self.record.setdefault("routes", []).append((score, cand, self.sel))
        if not self.sel.any():
            return None
        x_new = self.model.run_core(h, e, i, rope, KeyMask(self.cache, key_mask), slot, None)
        return x + (self.sel * gate).unsqueeze(-1).to(x.dtype) * x_new


def route(model, h, i, cand, cache, pos):
    """
    Expert-choice routing for recursion i of N = n_loops. Recursion i keeps a fraction
    (N-i)/N of the tokens, chosen among those recursion i-1 kept (cand, (B, T) bool), so a
    token's depth is the number of recursions before it is dropped. Router score
    s_i = w_i · h, on the raw state (MoR code).

    MoR picks the top-k scores over the whole sequence, which lets a token's depth depend
    on tokens after it. We keep the capacity but make the choice causal: token t is kept if
    the number of candidates at positions <= t that score higher than it, plus 1/2, is below
    keep * n_t, with n_t the number of those candidates and keep = (N-i)/(N-i+1) the fraction
    of candidates to keep. For exchangeable scores that keeps the same fraction in
    expectation, training and generation make the same choice, and generation only needs
    the scores and selections of earlier tokens, which the MoRCache stores per recursion.
    Returns (sel (B, T) bool, gate g = router_scale * σ(s) (B, T), scores s, key mask
    (B, pos+T): the tokens selected at recursion i, the only keys attention sees).
    """
    N = model.config.n_loops
    s = model.router(h)[..., i].float()
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
    return sel, model.config.router_scale * torch.sigmoid(s), s, key_mask


class KeyMask:
    """A view of a cache (or of none, in training) for one recursion: keys and values are
    stored as usual, and attention sees only the tokens this recursion kept (a query always
    sees itself)."""

    def __init__(self, cache, keys):
        self.cache, self.keys = cache, keys  # keys: (B, Tk) bool

    def update(self, slot, k, v, window=0):
        Tq = k.size(2)
        if self.cache is not None:
            k, v = self.cache.store(slot, k, v)
        Tk = k.size(2)
        mask = causal_mask(Tq, Tk, window, k.device)
        diagonal = torch.arange(Tk, device=k.device).view(1, -1) == torch.arange(Tk - Tq, Tk, device=k.device).view(-1, 1)
        return k, v, (mask & (self.keys[:, None, :] | diagonal)).view(-1, 1, Tq, Tk)


class MoRCache(KVCache):
    """The exact KV cache, plus every recursion's router scores and selections per token, so a
    new token is ranked against the earlier tokens exactly as in the full forward."""

    def __init__(self, n_slots, max_len):
        super().__init__(n_slots, max_len)
        self.route_score = self.route_sel = None

    def update_route(self, i, n_rec, score, sel=None):
        """Store recursion i's router scores (then its selections) for the new tokens;
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


# ---- Relaxed Recursive Transformers (Bae et al. 2025, arXiv 2410.20672) --------------------------
# Flags lora_rank, lora_targets: loop t's core block j adds B A x to each target matrix W x
# (W: out x in; A: r x in, B: out x r), one (A, B) pair per loop, block and target; B starts
# at zero, so at init every loop is the shared block. These are the only parameters that
# grow with n_loops. Hook: the target layers of the core's blocks become LoRALinear, and a
# pre-hook on each core block tells them the loop from the visit's slot. Uptraining (a looped
# model initialised from a plain one, train.py's init_from) is init_from_source below.

LORA_PLACE = {"q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"), "o": ("attn", "proj"),
              "fc": ("mlp", "fc"), "down": ("mlp", "proj")}  # each LoRA target's layer in a Block
LORA_MATRIX = {name: (lambda block, p=p: getattr(getattr(block, p[0]), p[1])) for name, p in LORA_PLACE.items()}


def lora_shapes(cfg):
    """{target: (in, out)} of the per-loop LoRA's matrices (lora_targets)."""
    d, q, kv = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    hidden = round(cfg.mlp_ratio * cfg.n_embd)
    shapes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d),
              "fc": (d, (2 if cfg.mlp == "swiglu" else 1) * hidden), "down": (hidden, d)}
    names = LORA_TARGETS if cfg.lora_targets == "all" else cfg.lora_targets.split(",")
    return {name: shapes[name] for name in LORA_TARGETS if name in names}


class LoRALinear(nn.Module):
    """A shared linear layer W x (+ b) plus loop t's low-rank delta B_t A_t x; `loop` is set
    by the block's pre-hook before each visit."""

    def __init__(self, linear, n_loops, rank):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # the shared layer's own parameters
        self.lora_A = nn.Parameter(torch.empty(n_loops, rank, linear.in_features))
        self.lora_B = nn.Parameter(torch.zeros(n_loops, linear.out_features, rank))
        self.loop = 0

    def forward(self, x):
        A, B = self.lora_A[self.loop], self.lora_B[self.loop]
        return F.linear(x, self.weight, self.bias) + (x @ A.T) @ B.T


def add_lora(model):
    """Each target layer of the core's blocks becomes a LoRALinear around it; a pre-hook tells
    them the loop of every visit."""
    cfg = model.config
    P, K, L = cfg.n_prelude, cfg.n_core, cfg.n_loops
    for j, block in enumerate(model.core):
        layers = []
        for name in lora_shapes(cfg):
            parent, attr = LORA_PLACE[name]
            layers.append(LoRALinear(LORA_MATRIX[name](block), L, cfg.lora_rank))
            setattr(getattr(block, parent), attr, layers[-1])

        def set_loop(block, args, layers=layers, j=j):
            # the visit's slot is P + t K + j (forward's fourth argument); loops past
            # n_loops reuse the last loop's LoRA
            slot = args[3] if len(args) > 3 else P + j
            for layer in layers:
                layer.loop = min((slot - P - j) // K, L - 1)
        block.register_forward_pre_hook(set_loop)


def init_lora(model):
    """A ~ N(0, 1/in) (drawn as one (loops, blocks, r, in) tensor per target), B = 0."""
    cfg = model.config
    for name, (n_in, n_out) in lora_shapes(cfg).items():
        A = torch.empty(cfg.n_loops, cfg.n_core, cfg.lora_rank, n_in)
        nn.init.normal_(A, std=n_in ** -0.5)
        for j, block in enumerate(model.core):
            LORA_MATRIX[name](block).lora_A.copy_(A[:, j])
            LORA_MATRIX[name](block).lora_B.zero_()


def add_qk_gains(model):
    """
    Qwen3 (Qwen team 2025, arXiv 2505.09388), a source for uptraining, norms each head's
    query and key with a learned gain before RoPE: q_h = g_q ⊙ norm(W_q x)_h, the same for k
    (flag qk_gains). Part 1's qk_norm has no gain and comes after RoPE, where the two orders
    agree; a gain per channel does not commute with the rotation, so this one goes first.
    Hook: a forward hook on every block's attn.q and attn.k (a LoRALinear too: the norm reads
    the adapted projection), holding its gain as .norm.
    """
    cfg = model.config
    for block in [*model.prelude, *model.core, *model.coda]:
        for layer in (block.attn.q, block.attn.k):
            layer.norm = RMSNorm(cfg.head_dim, True, cfg.norm_eps)
            layer.register_forward_hook(norm_heads)


def norm_heads(layer, args, out):
    return layer.norm(out.unflatten(-1, (-1, layer.norm.weight.numel()))).flatten(-2)


INIT_CORES = ("lower", "stepwise", "average")


def unrolled_blocks(model):
    """The blocks `model` runs at its train budget, in order (prelude, core x n_loops, coda),
    when that is all it runs: a plain stack, or a loop without injection, norm or modulation
    between its passes. Otherwise a ValueError: such a model is not a stack of layers."""
    cfg = model.config
    looped = cfg.n_loops > 1
    if looped and (cfg.injection != "none" or cfg.norm_state or cfg.loop_norm_f or cfg.modulation != "none"
                   or cfg.lora_rank or cfg.state_init != "prelude" or cfg.routing != "none" or cfg.selective_gate):
        raise ValueError("init_from needs a source that is a plain stack of layers: n_loops=1, or a loop with "
                         "injection='none' and no norm_state, loop_norm_f, modulation, lora_rank, state_init, "
                         "routing or selective_gate")
    return list(model.prelude) + [block for _ in range(cfg.n_loops) for block in model.core] + list(model.coda)


def init_from_source(target, source, init_core="average"):
    """
    Initialise the looped `target` from the pretrained `source` (both LoopGPT), as Relaxed
    Recursive Transformers convert a pretrained model. The source's layers S_0 .. S_{N-1}
    (unrolled_blocks) are split by the target's shape: the prelude takes the first P, the
    coda the last C, and the N - P - C between them are replaced by the core's K blocks
    looped T = (N - P - C) / K times, in order: loop t runs core block j where the source
    ran S_{P + Kt + j} (Relaxed's CYCLE sharing).
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
    shape_keys = ("n_embd", "n_head", "n_kv_head", "head_dim", "mlp", "mlp_ratio", "norm_gains", "qk_norm", "qk_gains",
                  "block_norm", "qkv_bias", "vocab_size", "tie_embeddings")
    differ = [f"{k}={getattr(source.config, k)!r} there, {getattr(cfg, k)!r} here" for k in shape_keys
              if getattr(cfg, k) != getattr(source.config, k)]
    if differ:
        raise ValueError(f"the source's layers do not fit this model ({'; '.join(differ)}): keep the source's values")
    with torch.no_grad():
        for dst, src in zip(list(target.prelude) + list(target.coda), layers[:P] + layers[len(layers) - C:]):
            dst.load_state_dict(src.state_dict())
        for j, block in enumerate(target.core):
            tied = [middle[K * t + j] for t in range(T)]
            # (strict=False: a LoRA target keeps its own A, B, set below)
            if init_core == "lower":
                block.load_state_dict(tied[0].state_dict(), strict=False)
            elif init_core == "stepwise":
                block.load_state_dict(middle[round(j * (len(middle) - 1) / max(1, K - 1))].state_dict(), strict=False)
            else:
                states = [b.state_dict() for b in tied]
                block.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}, strict=False)
        for name in ("wte", "lm_head", "norm_f"):
            getattr(target, name).load_state_dict(getattr(source, name).state_dict())
        errors = {}
        if cfg.lora_rank:
            r = cfg.lora_rank
            for which in lora_shapes(cfg):
                errs = []
                for t in range(T):
                    for j in range(K):
                        lora = LORA_MATRIX[which](target.core[j])
                        W = LORA_MATRIX[which](middle[K * t + j]).weight
                        R = W - lora.weight
                        U, S, Vh = torch.linalg.svd(R.float(), full_matrices=False)
                        k = min(r, S.numel())  # (a rank above the matrix's own leaves zero columns)
                        lora.lora_B[t].zero_()
                        lora.lora_A[t].zero_()
                        lora.lora_B[t, :, :k] = U[:, :k] * S[:k]
                        lora.lora_A[t, :k] = Vh[:k]
                        errs.append(float((S[r:] ** 2).sum() / W.float().pow(2).sum().clamp_min(1e-30)))
                errors[f"lora_{which}"] = errs
    return errors


# ---- LoopUS (Park et al. 2026, arXiv 2605.11011) ------------------------------------------------
# Flags selective_gate, confidence_head (and train.py's lambda_mono, freeze; sample.py's
# exit='confidence'). Hook: trunk passes each loop's output through loopus_update.

def loopus_update(model, x_new, x, record=None):
    """LoopUS's step between loops: records the update f(h) - x (the confidence head's
    input, for the training objective) and applies the selective gate."""
    if record is not None:
        record.setdefault("updates", []).append(x_new - x)
    return selective_update(model, x_new, x)


def selective_update(model, x_new, x):
    """
    The selective gate: the loop's proposal f(h) = x_new is mixed into the previous state x
    per token and channel,
        x_t = Ā ⊙ f(h) + (1 - Ā) ⊙ x = x + Ā ⊙ (f(h) - x),
        Ā = exp(-Δ ⊙ exp(A_log)),  Δ = softplus(W_up W_down (f(h) - x) + b),
    so 0 < Ā < 1 (a convex step towards the proposal, against hidden-state drift) and the
    step size depends on the update itself (Mamba's selective Δ, low rank d/16).
    Without the gate, x_new.
    """
    if not model.config.selective_gate:
        return x_new
    update = x_new - x
    dt = F.softplus(model.gate_up(model.gate_down(update)))
    return x + torch.exp(-dt * torch.exp(model.gate_A_log)) * update


def confidence_logit(model, update):
    """The confidence head on a loop's update f(h) - x (before the gate): the logit of "this
    loop's prediction is right", trained by BCE (train.py), read by exit='confidence'."""
    return model.confidence(model.confidence_norm(update)).squeeze(-1)


@torch.no_grad()
def layer_similarity(model, idx):
    """Mean cosine similarity between each layer's input and output over the tokens of idx,
    for the layers unrolled_blocks lists: the representations' staged dynamics that LoopUS
    reads to split a pretrained model. Early and late layers change the state most (low
    similarity); a middle stretch of small refinements (high similarity) is what loops
    well. train.py prints it when converting, to help choose n_prelude and n_coda."""
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


# ---- MELT (MELT: Memory-Efficient Looped Transformer, 2026, arXiv 2605.07721) --------------------
# Flags melt, melt_chunk (and train.py's melt_transition, melt_distill). Each core layer keeps
# a latent per token across loops, and its keys and values come from that latent: one K/V row
# per token and layer serves every loop, so the cache does not grow with the budget. Hooks:
# the core is made of MeltBlocks; trunk hands a whole sequence to melt_chunks; new_cache
# makes a MeltCache.

class MeltBlock(Block):
    """
    MELT's block (Eq. 1): h_t = z ⊙ h_{t-1} + (1 - z) ⊙ x_t, z = σ(W_z x_t + U_z h_{t-1} + b)
    (h_0 = x_1, so one loop is the plain block); keys and values come from h_t, queries from
    x_t. The latents live in the MeltCache, for the loops of one forward.
    """

    def __init__(self, cfg, window=0):
        gate = nn.Linear(2 * cfg.n_embd, cfg.n_embd)  # z's [W_z U_z] over [x; h], drawn before the block's layers
        super().__init__(cfg, window)
        self.melt_gate = gate
        # first among the block's modules: the init's random draws and the optimizer's
        # parameter order (and so saved optimizer states) follow this order
        self._modules = {"melt_gate": self._modules.pop("melt_gate"), **self._modules}

    def forward(self, x, rope, cache=None, slot=0, xq=None, c=None):
        j = cache.core_layer(slot)
        xn = self.norm_1(x)
        h = cache.latents.get(j, xn)
        z = torch.sigmoid(self.melt_gate(torch.cat([xn, h], dim=-1)))
        cache.latents[j] = h = z * h + (1 - z) * xn
        if cache.alpha < 1:  # phase 1: the attention also needs the plain layer's own K/V of xn
            cache.base = melt_base_kv(self.attn, xn, rope)
        return self.tail(x, self.attn(h, rope, cache, slot, xn))


def melt_base_kv(attn, x, rope):
    """The keys and values the plain layer would make of x (MELT's phase 1 mixes them in)."""
    B, T, _ = x.shape
    k = apply_rotary(attn.k(x).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2), *rope)
    k = norm(k) if attn.qk_norm else k
    return k, attn.v(x).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)


class MeltCache(KVCache):
    """
    MELT's cache: one slot per core layer, rewritten at every loop, so a past token's K/V
    are its last loop's (the prelude's and coda's slots as usual). Decoding writes in place
    into preallocated buffers, like the exact cache. Training (the forward runs chunk by
    chunk) keeps them out of place, concatenated chunk after chunk, so gradients flow
    through the earlier chunks' K/V; there alpha < 1 is MELT's interpolated transition
    (phase 1): attention reads α (shared MELT K/V) + (1 - α) (the plain loop's own K/V at
    this loop), for the past chunks and the current tokens alike.
    """

    def __init__(self, cfg, loops, alpha=1.0, decoding=False):
        super().__init__(cfg.n_prelude + cfg.n_core + cfg.n_coda, cfg.block_size)
        self.P, self.K, self.M, self.alpha, self.decoding = cfg.n_prelude, cfg.n_core, loops, alpha, decoding
        self.past, self.new = {}, {}  # training: buffer slot -> (K, V) of earlier chunks / of this chunk's latest loop
        self.past_base, self.new_base = {}, {}  # phase 1: visit slot -> the plain loop's own (K, V)
        self.latents, self.base = {}, None  # this forward's latent per core layer; phase 1's pending K/V

    def core_layer(self, slot):
        return (slot - self.P) % self.K

    def buffer(self, slot):
        """The prelude's slots, then one per core layer, then the coda's."""
        if slot < self.P:
            return slot
        if slot >= self.P + self.K * self.M:
            return slot - self.K * self.M + self.K
        return self.P + self.core_layer(slot)

    def update(self, slot, k, v, window=0):
        p = self.buffer(slot)
        if self.decoding:
            return super().update(p, k, v, window)
        self.new[p] = (k, v)
        if self.base is not None:  # phase 1
            self.new_base[slot], (bk, bv) = self.base, self.base
            k, v = self.alpha * k + (1 - self.alpha) * bk, self.alpha * v + (1 - self.alpha) * bv
            if p in self.past:
                (pk, pv), (qk, qv) = self.past[p], self.past_base[slot]
                k = torch.cat([self.alpha * pk + (1 - self.alpha) * qk, k], dim=2)
                v = torch.cat([self.alpha * pv + (1 - self.alpha) * qv, v], dim=2)
            self.base = None
        elif p in self.past:
            k, v = torch.cat([self.past[p][0], k], dim=2), torch.cat([self.past[p][1], v], dim=2)
        return visible(k, v, self.new[p][0].size(2), window)

    def advance(self, T):
        for store, new in ((self.past, self.new), (self.past_base, self.new_base)):
            for p, (k, v) in new.items():
                store[p] = (k, v) if p not in store else (torch.cat([store[p][0], k], dim=2),
                                                          torch.cat([store[p][1], v], dim=2))
            new.clear()
        self.latents = {}
        super().advance(T)

    def nbytes(self):
        return super().nbytes() if self.decoding else sum(k.nbytes + v.nbytes for k, v in self.past.values())


def melt_cache(model, loops):
    """new_cache's: MELT's cache for decoding."""
    if model.melt_alpha < 1:
        raise ValueError("MELT's interpolated transition (melt_alpha < 1) is a training mode: set melt_alpha = 1")
    return MeltCache(model.config, loops, decoding=True)


def melt_chunks(model, idx, steps, cache, record):
    """
    MELT's forward, chunk by chunk (its chunk-wise training, melt_chunk tokens at a time):
    each chunk runs every loop, its tokens attending to each other at the current loop
    and to the earlier chunks' shared K/V (their last loop's, from their latents), as
    tokens decoded later will. One chunk of one token at a time is cached decoding itself.
    """
    cache = cache if cache is not None else MeltCache(model.config, len(steps), model.melt_alpha)
    outs, records = [], []
    for s in range(0, idx.size(1), model.config.melt_chunk):
        records.append({} if record is not None else None)
        outs.append(model.trunk(idx[:, s:s + model.config.melt_chunk], steps, cache, records[-1]))
    if record is not None:  # each loop's states (and updates) over the whole sequence
        for key in records[0]:
            record.setdefault(key, []).extend(torch.cat(loop, dim=1) for loop in zip(*(r[key] for r in records)))
    return torch.cat(outs, dim=1)


# ================================================================================================
# Appendix: FLOPs and summary, the optimizer, the checkpoint format
# ================================================================================================

def compile_blocks(model, **kwargs):
    """torch.compile every Block in place (train.py's compile=True). One compiled block
    serves every loop and every budget M: the loop itself is plain Python, so changing M
    triggers no recompile (tests/test_compile.py counts them)."""
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(**kwargs)
    return model


def flops_per_token(model, loops=None):
    """
    Training FLOPs per token (forward + backward) at budget M, PaLM-style:
    6 * (matmul weights visited per token) + 12 * depth * d * T for attention.
    A looped core counts once per loop: compute grows with M, parameters do not.
    With truncated backprop (bptt_k) the loops before the last k run forward only:
    2 FLOPs per weight instead of 6.
    """
    cfg = model.config
    M = cfg.n_loops if loops is None else loops
    per_block = sum(p.numel() for p in model.core[0].parameters())
    forward = 2 * per_block + 4 * cfg.n_embd * cfg.block_size  # one block's forward, per token
    no_grad_loops = max(0, M - cfg.bptt_k) if cfg.bptt_k else 0  # their backward is skipped
    return (3 * forward * model.effective_depth(M) - 2 * forward * cfg.n_core * no_grad_loops
            + 6 * cfg.n_embd * cfg.vocab_size)  # + lm_head


def summary(model):
    cfg = model.config
    shape = f"{cfg.n_prelude} + {cfg.n_core}⊗{cfg.n_loops} + {cfg.n_coda}"
    flags = [f"injection={cfg.injection}"] + [f"{k}={getattr(cfg, k)}" for k, default in (
        ("modulation", "none"), ("state_init", "prelude"), ("norm_state", False), ("block_norm", "pre"),
        ("norm_gains", False), ("init", "nanochat"), ("window_pattern", "L"), ("exit_gate", False),
        ("lora_rank", 0), ("lora_targets", "q,v"), ("routing", "none"), ("bptt_k", 0), ("selective_gate", False),
        ("confidence_head", False), ("embed_norm", True), ("qkv_bias", False), ("melt", False))
        if getattr(cfg, k) != default]
    return (f"LoopGPT {shape} (prelude + core⊗loops + coda), d={cfg.n_embd}, {', '.join(flags)} | "
            f"{model.num_params() / 1e6:.2f}M unique params | effective depth {model.effective_depth()} | "
            f"{flops_per_token(model) / 1e6:.1f} MFLOPs/token (train, M={cfg.n_loops})")


def activation_bytes(cfg, batch, seq_len, loops, dtype=torch.float32):
    """A rough estimate of what a training step keeps for backward: per token and block
    visit ~12 d-wide tensors and 3 of the MLP's width; truncated backprop keeps the last
    bptt_k loops, activation checkpointing one loop plus every loop's input."""
    per_visit = batch * seq_len * (12 * cfg.n_embd + 3 * int(cfg.mlp_ratio * cfg.n_embd)) * dtype.itemsize
    grad_loops = min(loops, cfg.bptt_k) if cfg.bptt_k else loops
    if cfg.checkpoint_loops:
        visits = cfg.n_prelude + cfg.n_core + cfg.n_coda
        return visits * per_visit + grad_loops * batch * seq_len * cfg.n_embd * dtype.itemsize
    return (cfg.n_prelude + cfg.n_core * grad_loops + cfg.n_coda) * per_visit


def configure_optimizer(model, weight_decay, learning_rate, betas, optimizer="adamw", muon_lr=0.02,
                        embedding_lr=0.0, head_lr=0.0, eps=1e-8):
    """
    AdamW, or optimizer='muon': Muon (MuonAdamW, below) for the blocks' weight matrices (and
    Huginn's adapter), AdamW for embeddings, head, vectors and small side matrices, as
    nanochat and FLT train. embedding_lr / head_lr > 0 give wte / lm_head AdamW groups of
    their own at those rates (FLT's recipe); a tied matrix is the head, at head_lr. Every
    group has lr_scale: its peak lr over learning_rate, so one schedule drives them all.
    """
    # weight decay on matrices (linear layers, embeddings) only, never on vectors;
    # Parcae's recurrence parameters (A_log, dt_bias, B) are not decayed either:
    # decaying B towards 0 would cut the input out of the loop
    hidden, decay, no_decay, embedding, head = [], [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p is model.lm_head.weight and head_lr:  # checked first: a tied wte is this matrix
            head.append(p)
        elif name == "wte.weight" and embedding_lr and p is not model.lm_head.weight:
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
        return MuonAdamW(groups, betas=betas, eps=eps)
    # the fused kernel (one launch for all tensors) where the parameters are on a GPU,
    # decided from where they are, so it is never asked for where it does not exist. (A
    # CPU has one too, 6x faster than foreach here, but it rounds differently: every
    # CPU result in the README would move in its last digits, so CPUs keep foreach.)
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)


# ---- Muon: the optimizer configure_optimizer builds for the blocks' matrices ----------------
# Muon (Jordan et al. 2024; used by nanochat and by the FLT paper's training): for each
# weight matrix, the update is the momentum of its gradient made (nearly) orthogonal, i.e.
# G = U S V^T is replaced by about U V^T, computed with a few Newton-Schulz iterations
# instead of an SVD. Every direction of the matrix then moves by the same amount, whatever
# the gradient's spectrum. Embeddings, the head and vectors are not hidden-layer matrices:
# they keep AdamW, in the same optimizer object (one state dict for checkpoints).
# The matrices of one shape are orthogonalised together, as one batch of matmuls: one at a
# time, a 72-block stack's 432 small matrices made the step launch-bound (376 ms against 26
# ms for the looped 6-block model of the same FLOPs on an H200; docs/performance.md).
# Under DDP the gradients are averaged before step(), so every rank holds the same momenta:
# each rank orthogonalises its share of each batch and all-gathers the rest, so that every
# rank applies the same updates and none repeats another's work. Each matrix's update is
# a function of its own momentum alone, so batching and sharding change it by rounding at
# most (on a CPU not at all: tests/test_muon.py).
# Under FSDP a rank holds some rows of each matrix: each matrix is gathered whole for its
# update (orthogonalize_whole) and every rank keeps its own rows of the result.

# the quintic's coefficients from Muon: they push every singular value of the normalised
# matrix into about [0.7, 1.2] in 5 steps (fast, not exactly 1: Muon does not need exact)
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5):
    """About U V^T for G = U S V^T, by the quintic Newton-Schulz iteration
    X <- a X + (b A + c A^2) X, A = X X^T, from X = G / ||G||_F (so that ||X||_2 <= 1).
    G is one matrix (rows, cols) or a batch of them (..., rows, cols), each on its own."""
    a, b, c = NS_COEFFS
    # bf16 on GPU (as Muon does: fast and good enough); fp32 on CPU, where bf16 is slow
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the short side: A is min(rows, cols) square
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # each matrix by its own norm
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


def orthogonalize_whole(G, steps=5):
    """orthogonalize for a matrix that may be an FSDP2 shard (train.py's fsdp=True: a DTensor
    holding this rank's rows): Newton-Schulz works on the whole matrix, so every rank gathers
    it, orthogonalises it (all the same) and keeps its own rows of the result."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(G, DTensor):  # a whole matrix (one process, DDP)
        return orthogonalize(G, steps)
    return distribute_tensor(orthogonalize(G.full_tensor(), steps), G.device_mesh, G.placements, src_data_rank=None)


def muon_momentum(step, warmup, start=0.85, end=0.95):
    """Muon's momentum at `step`: linear from `start` to `end` over `warmup` steps, then
    `end` (FLT's and nanochat's schedule, warmup 300); warmup 0 = `end` throughout."""
    frac = min(step / warmup, 1.0) if warmup > 0 else 1.0
    return (1 - frac) * start + frac * end


def rank_and_world():
    """This process's rank and the number of processes, (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class MuonAdamW(torch.optim.Optimizer):
    """
    One optimizer, two rules. Groups with use_muon=True: SGD momentum (Nesterov), the
    momentum orthogonalised, scaled by sqrt(max(1, rows / cols)) so a tall matrix's
    update has the RMS of a square one's, decoupled weight decay. Other groups: AdamW.
    Under torch.distributed every rank must hold the same parameters and gradients (DDP):
    step() then splits the orthogonalisation across the ranks. batched: True runs Newton-
    Schulz on each shape's matrices as one batch, False one matrix at a time (the same
    updates); None (default) batches on a GPU and not on a CPU, where torch's batched
    matmul is slower than a loop of single ones (bench.py --only=muon measures both).
    """

    def __init__(self, groups, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, ns_steps=5, batched=None):
        super().__init__(groups, dict(lr=0.0, weight_decay=0.0, use_muon=False, betas=betas, eps=eps,
                                      momentum=momentum, ns_steps=ns_steps))
        for group in self.param_groups:
            if group["use_muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon updates 2-D weight matrices only")
        self.batched = batched

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                same_shape = {}  # the matrices of one shape: one batch for Newton-Schulz
                for p in params:
                    same_shape.setdefault(p.shape, []).append(p)
                for matrices in same_shape.values():
                    self.muon_update(matrices, group)
                continue
            lr, wd = group["lr"], group["weight_decay"]
            for p in params:
                state = self.state[p]
                p.mul_(1 - lr * wd)  # decoupled weight decay, as in AdamW
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

    def muon_update(self, params, group):
        """One Muon step of `params`, matrices of one shape in one group: their momenta
        updated, the Nesterov directions orthogonalised as one batch (each rank its share
        under torch.distributed, then all-gathered), weight decay, the update applied.
        (torch._foreach_* ops: one kernel launch for the list where a GPU has them.)"""
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        grads = [p.grad for p in params]
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum"] = torch.zeros_like(p)
        bufs = [self.state[p]["momentum"] for p in params]
        # buf <- mu buf + g, update from g + mu buf. FLT's (nanochat's) Muon keeps
        # an EMA instead: buf <- lerp(buf, g, 1 - mu), update from lerp(g, buf, mu).
        # With mu constant, theirs is (1 - mu) times ours at every step, and
        # Newton-Schulz first divides by the norm: the same orthogonalised update.
        # (While mu warms up the two differ slightly in how past steps are weighted.)
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        if hasattr(params[0], "full_tensor"):  # FSDP: this rank holds rows of every matrix (DTensors)
            nesterov = torch._foreach_add(grads, bufs, alpha=mu)
            update = [orthogonalize_whole(g, group["ns_steps"]) for g in nesterov]
        else:
            update = list(self.orthogonalize_shared(grads, bufs, mu, group["ns_steps"]).unbind(0))
        if lr * wd:
            torch._foreach_mul_(params, 1 - lr * wd)  # decoupled weight decay, as in AdamW
        rows, cols = params[0].shape
        torch._foreach_add_(params, update, alpha=-lr * max(1.0, rows / cols) ** 0.5)

    def orthogonalize_shared(self, grads, bufs, mu, steps):
        """The Nesterov directions g + mu buf of whole matrices (every rank holds the same),
        orthogonalised as one batch, each rank its share under torch.distributed: ceil(n /
        world) matrices, the last shares padded with zeros (which orthogonalise to zeros) so
        every rank sends the same size, then all-gathered. Returns (n, rows, cols)."""
        rank, world = rank_and_world()
        n = len(grads)
        share = -(-n // world)
        lo, hi = min(n, rank * share), min(n, (rank + 1) * share)
        nesterov = list(torch._foreach_add(grads[lo:hi], bufs[lo:hi], alpha=mu)) if hi > lo else []
        nesterov += [torch.zeros_like(grads[0])] * (share - len(nesterov))
        if self.batched or (self.batched is None and grads[0].device.type != "cpu"):
            update = orthogonalize(torch.stack(nesterov), steps)
        else:
            update = torch.stack([orthogonalize(g, steps) for g in nesterov])
        if world > 1:
            everyone = update.new_empty(world * share, *update.shape[1:])
            dist.all_gather(list(everyone.chunk(world)), update)  # (torch 2.13 deprecates all_gather_into_tensor)
            update = everyone[:n]
        return update


# ---- checkpoints ----------------------------------------------------------------------------
# A checkpoint is a dict of tensors and plain values (model weights, model_config, the
# optimizer's state, train_config, data_meta with the tokenizer, iter_num): written
# atomically, read with weights_only=True, so a file cannot run code, and checked before use.
# Errors are ValueErrors with one readable line; the scripts print them and stop.

CHECKPOINT_VERSION = 3  # 2: MoR and Huginn's sandwich adapter follow their authors' code; 3: LoRA in the layers


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
    if ckpt["version"] not in (1, 2, CHECKPOINT_VERSION):
        raise ValueError(f"{path} has checkpoint version {ckpt['version']}, this code reads versions 1 to "
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
        model.load_state_dict(lora_in_layers(ckpt["model"]))
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"checkpoint does not fit the model config: {str(e).splitlines()[0]}") from None
    return model


def lora_in_layers(state):
    """Weights saved before version 3 kept per-loop LoRA as lora_A_q (loops, blocks, r, in),
    ...: each block's share moves into its layer (core.j.attn.q.lora_A (loops, r, in))."""
    state = dict(state)
    for key in [k for k in state if k.startswith(("lora_A_", "lora_B_"))]:
        which, name = key[5], key[7:]
        parent, attr = LORA_PLACE[name]
        for j, part in enumerate(state.pop(key).unbind(1)):
            state[f"core.{j}.{parent}.{attr}.lora_{which}"] = part
    return state
