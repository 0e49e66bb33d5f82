# Base 6⊗1: a plain 6-block GPT, the compute of 3⊗8 at M = 2.
# Everything else as configs/base_loop_3x8.py.
from configs.base_loop_3x8 import *  # noqa: F401,F403

out_dir = "out-base-6x1"
n_core = 6
n_loops = 1
