# A plain (unlooped) GPT: 8 blocks, each run once. The baseline for configs/base_loop.py:
# same effective depth and compute per token, 4x the block parameters. CPU, built-in corpus.
dataset = "pydoc"
out_dir = "out-base"
n_embd = 128
n_head = 4
n_prelude = 0
n_core = 8
n_coda = 0
n_loops = 1
block_size = 128
batch_size = 8
grad_accum_steps = 2       # 16 rows per step; on 2 processes each runs one micro-step
max_iters = 600
eval_interval = 100
eval_iters = 10
warmup_iters = 30
learning_rate = 3e-3
min_lr = 3e-4
