# p-hop induction (data/tasks/prepare.py), looped: a 2-block core looped 4 times, k⊗L = 2⊗4
# (Saunshi et al. 2025 compare k⊗L with (kL)⊗1 = task_phop_deep and k⊗1 = task_phop_shallow).
# Loss on the answer only; every eval reports exact-match accuracy per budget and per hop count.
#   python train.py --config task_phop_loop        (CPU, minutes; generates the task on first use)
dataset = "tasks/phop"
out_dir = "out-task-phop-loop"
n_embd = 128
n_head = 4
n_prelude = 0
n_core = 2
n_coda = 0
n_loops = 4
injection = "none"
block_size = 64
batch_size = 64
grad_accum_steps = 1
max_iters = 2000
eval_interval = 500
eval_iters = 4
warmup_iters = 50
learning_rate = 3e-3
min_lr = 3e-4
weight_decay = 0.1
eval_budgets = (1, 2, 4, 8)
