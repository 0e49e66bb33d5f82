# Parcae: prelude 2, core 2, coda 2 with a stable diagonal recurrence around the core
# (diag: h = Ā h + Δ B ē, 0 < Ā < 1), a random initial state.
# d=384 (3 heads of 128), seq 1024, FineWeb-Edu with the GPT-2 tokenizer, 8 loops on average,
# with depth sampled per step and truncated backprop.
# Data first: python data/fineweb_edu/prepare.py --num_shards=18
#   torchrun --nproc_per_node=8 train.py --config parcae_small
# CPU twin on the built-in corpus: --config parcae_tiny
dataset = "fineweb_edu"
out_dir = "out-parcae-small"
n_embd = 384
n_head = 3
n_prelude = 2
n_core = 2
n_coda = 2
n_loops = 8
injection = "diag"
state_init = "randn"
block_norm = "pre"
block_size = 1024
vocab_size = 50304
# 49.4M params x 20 tokens = 1884 steps of 524,288 tokens
batch_size = 32
grad_accum_steps = 16
max_iters = 1884
warmup_iters = 100
learning_rate = 1e-3
min_lr = 1e-4
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 250
eval_iters = 20
eval_budgets = (1, 4, 8, 16)
compile = True
loop_sampling = "per_sequence"        # Parcae: every row draws its own depth
bptt_k = 4
