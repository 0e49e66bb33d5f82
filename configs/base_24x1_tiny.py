# Base 24⊗1: a plain 24-block GPT, the same compute as 3⊗8 at M = 8.
# Everything else as configs/base_loop_3x8_tiny.py (CPU twin, built-in corpus).
from configs.base_loop_3x8_tiny import *  # noqa: F401,F403

out_dir = "out-base-24x1-tiny"
n_core = 24
n_loops = 1
