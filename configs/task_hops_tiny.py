# hops on the CPU: the looped model (configs/task_hops_loop.py).
from configs.task_hops_loop import *  # noqa: F401,F403
