# CPU twin of the LoopFormer table on the built-in corpus: Base-Loop 3⊗8 at d=128. The other
# *_tiny rows (base_24x1_tiny, tmlt_3x8_tiny, naive_loop_ee_3x8_tiny, base_loop_ee_cons_3x8_tiny,
# tmlt_ee_3x8_tiny, loopformer_3x8_tiny) import this file and change one thing each.
dataset = "pydoc"
out_dir = "out-base-loop-3x8-tiny"
n_embd = 128
n_head = 4
n_prelude = 0
n_core = 3
n_coda = 0
n_loops = 8
injection = "none"
mlp = "gelu"
tie_embeddings = True
block_size = 128
batch_size = 8
grad_accum_steps = 2
max_iters = 300
eval_interval = 100
eval_iters = 10
warmup_iters = 30
learning_rate = 3e-3
min_lr = 3e-4
eval_budgets = (1, 2, 4, 8)
