# hops, shallow baseline: k⊗1 = the looped model's 2 blocks run once.
from configs.task_hops_loop import *  # noqa: F401,F403

out_dir = "out-task-hops-shallow"
n_core = 2
n_loops = 1
eval_budgets = (1,)
loop_sampling = "fixed"
