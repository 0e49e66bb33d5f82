# LT (Looped Transformer, no injection), Saunshi et al. 2025.
# FLT paper Table 1, small size: depth 6, d = 64 * depth = 384, head dim 128 (3 heads),
# seq 1024, the whole 6-block stack looped 12 times (Table 1's columns: --n_loops=3, 6, 9),
# FineWeb-Edu with the GPT-2 tokenizer, 20 tokens per parameter, bf16, grad clip 1.0.
# Data first (~55M tokens a shard): python data/fineweb_edu/prepare.py --num_shards=18
#   torchrun --nproc_per_node=8 train.py --config lt_small
# CPU twin on the built-in corpus: --config lt_tiny
dataset = "fineweb_edu"
out_dir = "out-lt-small"
n_embd = 384
n_head = 3
n_prelude = 0
n_core = 6
n_coda = 0
n_loops = 12
injection = "none"
block_size = 1024
vocab_size = 50304          # GPT-2's 50257 padded to a multiple of 64
# 49.3M params x 20 tokens = 0.99B tokens = 1879 steps of 524,288 tokens
batch_size = 32
grad_accum_steps = 16       # global; split over the torchrun processes (1, 2, 4, 8, 16)
max_iters = 1879
warmup_iters = 100
learning_rate = 0.001
min_lr = 0.0001
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 250
eval_iters = 20
eval_budgets = (1, 3, 6, 12, 24)
compile = True              # bf16 autocast is on whenever the device is CUDA
