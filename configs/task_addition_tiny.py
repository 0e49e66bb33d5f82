# addition on the CPU: the looped model (configs/task_addition_loop.py).
from configs.task_addition_loop import *  # noqa: F401,F403
