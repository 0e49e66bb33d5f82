# hops, deep baseline: (kL)⊗1 = 8 blocks run once.
from configs.task_hops_loop import *  # noqa: F401,F403

out_dir = "out-task-hops-deep"
n_core = 8
n_loops = 1
eval_budgets = (1,)
loop_sampling = "fixed"
