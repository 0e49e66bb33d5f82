# LTi (Looped Transformer with input injection, injection "add") at the FLT paper's small size, for GPUs:
# depth 6, d = 64 * depth = 384, head dim 128 (3 heads), seq 1024, the whole 6-block
# stack looped (FLT Table 1 trains 3 / 6 / 9 loops: --n_loops=6 or 9), FineWeb-Edu with
# the GPT-2 tokenizer. Data first: python data/fineweb_edu/prepare.py --num_shards=20
# (~55M GPT-2 tokens per shard: 20 shards hold the ~1B tokens of one epoch)
#   torchrun --nproc_per_node=8 train.py --config lti_small
dataset = "fineweb_edu"
out_dir = "out-lti-small"
n_embd = 384
n_head = 3
n_prelude = 0
n_core = 6
n_coda = 0
n_loops = 3
injection = "add"
block_size = 1024
vocab_size = 50304          # GPT-2's 50257 padded to a multiple of 64
# 20 tokens per parameter (Chinchilla, as FLT): ~49.3M params -> ~0.99B tokens
# = 1880 steps of 32 rows x 1024 tokens x 16 micro-steps (524,288 tokens per step)
batch_size = 32
grad_accum_steps = 16       # global; split over the torchrun processes (1, 2, 4, 8, 16)
max_iters = 1880
warmup_iters = 100
learning_rate = 1e-3
min_lr = 1e-4
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 250
eval_iters = 40
compile = True              # bf16 autocast is on whenever the device is CUDA
