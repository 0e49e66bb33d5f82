# Huginn-style recurrent depth (Geiping et al. 2025): prelude 2, core 4, coda 2, the adapter
# W_a[h; e] (concat) and a random initial state.
# d=384 (3 heads of 128), seq 1024, FineWeb-Edu with the GPT-2 tokenizer, 8 loops on average,
# with depth sampled per step and truncated backprop.
# Data first: python data/fineweb_edu/prepare.py --num_shards=20
#   torchrun --nproc_per_node=8 train.py --config huginn_small
# CPU twin on the built-in corpus: --config huginn_tiny
dataset = "fineweb_edu"
out_dir = "out-huginn-small"
n_embd = 384
n_head = 3
n_prelude = 2
n_core = 4
n_coda = 2
n_loops = 8
injection = "concat"
state_init = "randn"
# Huginn's block and init (its code): sandwich norm with learnable gains, its small init
# (output projections scaled by the depth, a random adapter W_a), SwiGLU 3.39x wide,
# RoPE base 5e4, no QK-norm, tied embeddings. (Without the gains and the init, the sandwich
# stalls: README, Known problems.)
block_norm = "sandwich"
norm_gains = True
init = "huginn"
mlp = "swiglu"
mlp_ratio = 3.39            # Huginn: 17,920 / 5,280
rope_base = 50000.0
qk_norm = False
tie_embeddings = True
block_size = 1024
vocab_size = 50304
# 36.3M params (tied embeddings) x 20 tokens = 1386 steps of 524,288 tokens
batch_size = 32
grad_accum_steps = 16
max_iters = 1386
warmup_iters = 100
learning_rate = 1e-3
min_lr = 1e-4
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 250
eval_iters = 20
eval_budgets = (1, 4, 8, 16)
compile = True
loop_sampling = "poisson_lognormal"   # Huginn: Poisson(e^τ) + 1 with mean ~ n_loops
bptt_k = 8                 # Huginn backpropagates through the last 8 loops only
