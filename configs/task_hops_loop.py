# Multi-hop fact composition (data/tasks/prepare.py): train on questions of 1..3 hops, val
# also has 4..6 hops (out of distribution). Looped 2⊗4 with input injection, trained with
# a depth drawn per step (Huginn's Poisson-lognormal, mean 4) so that it can be run with
# more loops at test time: the depth-extrapolation experiment (README) runs
#   python train.py --config task_hops_loop --eval_only=True --resume=True
# after training, for exact match per hop count at every budget M = 1..8.
from configs.task_phop_loop import *  # noqa: F401,F403

dataset = "tasks/hops"
out_dir = "out-task-hops-loop"
block_size = 64
batch_size = 64
injection = "add"
loop_sampling = "poisson_lognormal"
bptt_k = 4
max_iters = 3000
