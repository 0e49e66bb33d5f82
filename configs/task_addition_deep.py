# addition, deep baseline: (kL)⊗1 = 8 blocks run once.
from configs.task_addition_loop import *  # noqa: F401,F403

out_dir = "out-task-addition-deep"
n_core = 8
n_loops = 1
eval_budgets = (1,)
