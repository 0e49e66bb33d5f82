# Multi-digit addition (data/tasks/prepare.py: operands of 1..5 digits, answer digits
# reversed), looped: k⊗L = 2⊗4; compare task_addition_deep (8⊗1) and task_addition_shallow (2⊗1).
#   python train.py --config task_addition_loop
from configs.task_phop_loop import *  # noqa: F401,F403

dataset = "tasks/addition"
out_dir = "out-task-addition-loop"
max_iters = 1000
