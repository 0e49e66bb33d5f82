# CPU twin of ltai_small: LTai (first layer's attention queries from h_{t-1}), FLT paper.
# A 2-block core looped 12 times (--n_loops=3, 6 ...), d=128, on the built-in corpus: minutes.
dataset = "pydoc"
out_dir = "out-ltai-tiny"
n_embd = 128
n_head = 4
n_prelude = 0
n_core = 2
n_coda = 0
n_loops = 12
injection = "attn_first"
block_size = 128
batch_size = 8
grad_accum_steps = 2
max_iters = 300
eval_interval = 100
eval_iters = 10
warmup_iters = 30
learning_rate = 3e-3
min_lr = 3e-4
