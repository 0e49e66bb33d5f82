# p-hop induction, deep baseline: (kL)⊗1 = 8 blocks run once, the looped model's effective
# depth with 4x its parameters.
from configs.task_phop_loop import *  # noqa: F401,F403

out_dir = "out-task-phop-deep"
n_core = 8
n_loops = 1
eval_budgets = (1,)
