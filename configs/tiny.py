# The default config: a 1 + 2⊗4 + 1 looped GPT (prelude, 2-block core looped 4 times,
# coda; effective depth 10) on the built-in pydoc corpus. CPU, a few minutes.
dataset = "pydoc"
out_dir = "out"
n_embd = 128
n_head = 4
n_prelude = 1
n_core = 2
n_coda = 1
n_loops = 4
injection = "add"
block_size = 128
batch_size = 8
grad_accum_steps = 2       # 16 rows per step; on 2 processes each runs one micro-step
max_iters = 600
eval_interval = 100
eval_iters = 10
warmup_iters = 30
learning_rate = 3e-3
min_lr = 3e-4
