# Parcae: prelude 2, core 2, coda 2 with a stable diagonal recurrence around the core
# (diag: h = Ā h + Δ B ē, 0 < Ā < 1), a random initial state.
# d=384 (3 heads of 128), seq 1024, FineWeb-Edu with the GPT-2 tokenizer, 8 loops on average,
# with depth sampled per step and truncated backprop.
# Data first: python data/fineweb_edu/prepare.py --num_shards=18
#   torchrun --nproc_per_node=8 train.py --config parcae_small
# CPU twin on the built-in corpus: --config parcae_tiny
# Training settings as configs/huginn_small.py; the model is Parcae's (below).
from configs.huginn_small import *  # noqa: F401,F403

# 30.2M params (tied embeddings) x 20 tokens = 1153 steps of 524,288 tokens
out_dir = "out-parcae-small"
n_prelude = 2
n_core = 2
n_coda = 2
n_loops = 8
injection = "diag"
state_init = "randn_small"        # Parcae: trunc-normal std sqrt(2/(5d)), no sqrt(d)
block_norm = "pre"
mlp = "relu2"               # (not Huginn's SwiGLU and plain QK-norm attention)
mlp_ratio = 4.0
qk_norm = True
max_iters = 1153
loop_sampling = "per_sequence"        # Parcae: every row draws max(1, Poisson(8)) loops
bptt_k = 4
# Parcae's model (its code): learnable norm gains, its small init with zero output
# projections and a random C, tied embeddings, RoPE base 5e4, no soft-cap
norm_gains = True
init = "parcae"
tie_embeddings = True
rope_base = 50000.0
softcap = 0.0
