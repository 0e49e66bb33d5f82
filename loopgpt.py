"""
loopgpt: a looped (recurrent-depth, weight-tied) GPT in one file.

    tokens -> wte -> prelude (n_prelude blocks)
           -> core (n_core blocks, looped M times, the same weights every loop)
           -> coda (n_coda blocks) -> norm -> lm_head -> soft-capped logits

`k ⊗ L` means a k-block core looped L times; the effective depth is
n_prelude + k*M + n_coda at loop budget M, and the parameter count never depends on M.
A model trained at L = n_loops may be run at any budget M >= 1, including M > L.

How the previous loop's state h_{t-1} and the loop input e enter loop t is the
*injection* (see `LoopGPT.inject` and ../shared/DESIGN.md §4). Every variant is one
branch you can find by searching for its flag value, e.g. `injection == "add"`.

The block follows nanochat (DESIGN §3): pre-norm, parameter-free RMSNorm, RoPE,
QK-norm, optional GQA, ReLU² MLP, no biases, zero-initialised output projections,
logit soft-cap.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

INJECTIONS = ("none", "add")
MLPS = ("relu2", "gelu")


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
    injection: str = "none"    # one of INJECTIONS
    mlp: str = "relu2"         # one of MLPS
    tie_embeddings: bool = False
    softcap: float = 15.0      # logits = c * tanh(logits / c); 0 turns it off
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        problems = []
        if self.injection not in INJECTIONS:
            problems.append(f"injection={self.injection!r} (valid: {', '.join(INJECTIONS)})")
        if self.mlp not in MLPS:
            problems.append(f"mlp={self.mlp!r} (valid: {', '.join(MLPS)})")
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


def rotary_table(seq_len, head_dim, base):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()  # (seq_len, head_dim/2) each


def apply_rotary(x, cos, sin):
    # x: (B, H, T, hd); rotate the pairs (x1_i, x2_i) by the angle of each position
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """
    Keys and values for generation, one slot per (loop, layer) visit: prelude layers,
    then core layer j at loop t, then coda layers. Each loop's attention reads the keys
    of the *same* loop, so a single cache shared by all loops would not reproduce the
    full forward (FLT's official code caches only the last loop: DESIGN §8).
    Buffers are preallocated to block_size so decoding never concatenates.
    """

    def __init__(self, n_slots, max_len):
        self.n_slots, self.max_len = n_slots, max_len
        self.k = self.v = None
        self.pos = 0  # tokens already in the cache

    def update(self, slot, k, v):
        if self.k is None:  # allocate on first use, in the dtype autocast produced
            B, H, _, hd = k.shape
            self.k = k.new_zeros(self.n_slots, B, H, self.max_len, hd)
            self.v = torch.zeros_like(self.k)
        end = self.pos + k.size(2)
        self.k[slot, :, :, self.pos:end] = k
        self.v[slot, :, :, self.pos:end] = v
        return self.k[slot, :, :, :end], self.v[slot, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q = nn.Linear(cfg.n_embd, self.n_head * self.head_dim, bias=False)
        self.k = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.v = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, rope, cache=None, slot=0):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm after RoPE
        if cache is not None:
            k, v = cache.update(slot, k, v)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_head != self.n_kv_head
        if Tq == Tk:  # training, or prefilling an empty cache
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:  # one new token attends to everything cached
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # a chunk after a cached prefix: causal, offset by the prefix length
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        self.act = cfg.mlp

    def forward(self, x):
        x = self.fc(x)
        x = F.relu(x).square() if self.act == "relu2" else F.gelu(x)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, cache=None, slot=0):
        x = x + self.attn(norm(x), rope, cache, slot)
        x = x + self.mlp(norm(x))
        return x


class LoopGPT(nn.Module):
    def __init__(self, cfg: LoopGPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        self.core = nn.ModuleList(Block(cfg) for _ in range(cfg.n_core))  # looped, weight-tied
        self.coda = nn.ModuleList(Block(cfg) for _ in range(cfg.n_coda))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # RoPE tables are recomputed, not saved: they are a function of the config
        cos, sin = rotary_table(cfg.block_size, cfg.n_embd // cfg.n_head, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def init_weights(self):
        cfg = self.config
        for name, p in self.named_parameters():
            if p.dim() == 2 and name.startswith(("prelude", "core", "coda")):
                if name.endswith("proj.weight"):
                    # zero-init output projections: every block starts as the identity,
                    # so at init looping more cannot blow the residual stream up
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, std=p.size(1) ** -0.5)
        # the embedding is RMS-normed after lookup, so its scale is free; a tied
        # matrix also produces the logits, so it gets the small output scale
        nn.init.normal_(self.wte.weight, std=cfg.n_embd ** -0.5 if cfg.tie_embeddings else 1.0)
        nn.init.normal_(self.lm_head.weight, std=cfg.n_embd ** -0.5 if cfg.tie_embeddings else 0.001)

    # ---- the loop --------------------------------------------------------------------

    def inject(self, h, e, t):
        """
        The core's input at loop t (0-based) from the previous state h = h_{t-1} and the
        loop input e (the prelude output, i.e. the normed embedding when n_prelude = 0).
        Loop 0 is a plain pass in every variant: h_0 = e. DESIGN §4.
        """
        inj = self.config.injection
        if t == 0 or inj == "none":
            # LT / Base-Loop (Saunshi et al. 2025): the state flows straight through
            return h
        if inj == "add":
            # LTi, input injection (Yang et al. 2024, looped transformers): re-add the
            # input every loop, x = norm(e + h_{t-1}), so the model cannot forget it
            return norm(e + h)
        raise AssertionError(inj)

    def forward(self, idx, targets=None, loops=None, cache=None):
        """
        idx (B, T) token ids; targets (B, T) or None (-1 = ignored position);
        loops = budget M (default n_loops, any M >= 1); cache = KVCache for generation.
        Returns (logits (B, T, V) in float32, loss or None).
        """
        cfg = self.config
        M = check_loops(cfg.n_loops if loops is None else loops)
        B, T = idx.shape
        pos = cache.pos if cache is not None else 0
        if pos + T > cfg.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds block_size={cfg.block_size}")
        rope = (self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T])

        x = norm(self.wte(idx))
        slot = 0  # KV-cache slot of the next (loop, layer) visit
        for block in self.prelude:
            x = block(x, rope, cache, slot)
            slot += 1
        e = h = x  # loop input and initial state h_0
        for t in range(M):
            x = self.inject(h, e, t)
            for block in self.core:
                x = block(x, rope, cache, slot)
                slot += 1
            h = x
        for block in self.coda:
            x = block(x, rope, cache, slot)
            slot += 1
        if cache is not None:
            cache.pos += T

        logits = self.lm_head(norm(x)).float()
        if cfg.softcap > 0:
            logits = cfg.softcap * torch.tanh(logits / cfg.softcap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # ---- generation --------------------------------------------------------------------

    def new_cache(self, loops):
        cfg = self.config
        return KVCache(cfg.n_prelude + cfg.n_core * loops + cfg.n_coda, cfg.block_size)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, loops=None, temperature=1.0, top_k=None,
                 use_cache=True, generator=None):
        """
        Sample max_new_tokens tokens after idx (B, T) at loop budget `loops`.
        temperature 0 means greedy. The context is cropped to the last block_size
        tokens. With use_cache the prompt is prefilled once and each new token runs one
        position through every (loop, layer); once the text outgrows block_size, each
        step rebuilds the cache from the cropped window (every position's K/V depends on
        the window it saw), so cached and uncached decoding stay identical.
        """
        M = check_loops(self.config.n_loops if loops is None else loops)
        bs = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -bs:], loops=M)
            elif cache is None or idx.size(1) > bs:
                cache = self.new_cache(M)
                logits, _ = self(idx[:, -bs:], loops=M, cache=cache)
            else:
                logits, _ = self(idx[:, -1:], loops=M, cache=cache)
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
        """
        cfg = self.config
        depth = self.effective_depth(loops)
        per_block = sum(p.numel() for p in self.core[0].parameters())
        n_visited = per_block * depth + cfg.n_embd * cfg.vocab_size  # blocks + lm_head
        return 6 * n_visited + 12 * depth * cfg.n_embd * cfg.block_size

    def summary(self):
        cfg = self.config
        shape = f"{cfg.n_prelude} + {cfg.n_core}⊗{cfg.n_loops} + {cfg.n_coda}"
        return (f"LoopGPT {shape} (prelude + core⊗loops + coda), d={cfg.n_embd}, "
                f"injection={cfg.injection} | {self.num_params() / 1e6:.2f}M unique params | "
                f"effective depth {self.effective_depth()} | "
                f"{self.flops_per_token() / 1e6:.1f} MFLOPs/token (train, M={cfg.n_loops})")

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        # weight decay on matrices (linear layers, embeddings) only, never on vectors
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


def check_loops(M):
    if isinstance(M, bool) or not isinstance(M, int) or M < 1:
        raise ValueError(f"loop budget must be an integer >= 1, got {M!r}")
    return M
