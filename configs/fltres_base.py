# FLTres (x = norm(x + h_{t-1}) before every layer), FLT paper.
# FLT paper Table 1, base size: depth 12, d = 64 * depth = 768, head dim 128 (6 heads),
# seq 1024, the whole 12-block stack looped 12 times (Table 1's columns: --n_loops=3, 6, 9),
# FineWeb-Edu with the GPT-2 tokenizer, 20 tokens per parameter, bf16, grad clip 1.0.
# Data first (~55M tokens a shard): python data/fineweb_edu/prepare.py --num_shards=59
#   torchrun --nproc_per_node=8 train.py --config fltres_base
# CPU twin on the built-in corpus: --config fltres_tiny
dataset = "fineweb_edu"
out_dir = "out-fltres-base"
n_embd = 768
n_head = 6
n_prelude = 0
n_core = 12
n_coda = 0
n_loops = 12
injection = "full_res"
block_size = 1024
vocab_size = 50304          # GPT-2's 50257 padded to a multiple of 64
# 162.2M params x 20 tokens = 3.24B tokens = 6188 steps of 524,288 tokens
batch_size = 8                # 144 effective layers of activations: keep micro-batches small
grad_accum_steps = 64       # global; split over the torchrun processes (1, 2, 4, 8, 16)
max_iters = 6188
warmup_iters = 100
learning_rate = 0.0006
min_lr = 6e-05
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 250
eval_iters = 20
eval_budgets = (1, 3, 6, 12, 24)
compile = True              # bf16 autocast is on whenever the device is CUDA
