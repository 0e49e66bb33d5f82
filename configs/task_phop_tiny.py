# p-hop induction on the CPU: the looped model (configs/task_phop_loop.py).
from configs.task_phop_loop import *  # noqa: F401,F403
