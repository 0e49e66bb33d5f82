# Multi-hop composition over parametric knowledge (data/tasks/prepare.py, Kohli et al. 2026):
# train on 1..3 hops, val has unseen 2..3-hop compositions and 4..6 hops (out of
# distribution). Looped 2⊗4 trained with a depth drawn per step, uniform in 3..6, so that it
# can be run with more loops at test time. The depth-extrapolation experiment (README):
#   python train.py --config task_hops_loop                                   (~6 min, CPU)
#   python train.py --config task_hops_loop --eval_only=True --resume=True    (M = 1..8)
# Muon and a big batch of these 10-token rows are what make it learn in minutes: with AdamW
# at batch 64 the answer stays at chance for 1,000+ steps (README).
from configs.task_phop_loop import *  # noqa: F401,F403

dataset = "tasks/hops"
out_dir = "out-task-hops-loop"
block_size = 16
batch_size = 256
optimizer = "muon"
learning_rate = 1e-3
min_lr = 1e-3  # constant after warmup
injection = "none"
loop_sampling = "uniform"
loop_min = 3
loop_max = 6
max_iters = 1200
eval_interval = 400
eval_budgets = (4, 8)
