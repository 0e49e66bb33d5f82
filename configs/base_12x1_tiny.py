# Base 12⊗1: a plain 12-block GPT, the compute of 3⊗8 at M = 4.
# Everything else as configs/base_loop_3x8_tiny.py (CPU twin, built-in corpus).
from configs.base_loop_3x8_tiny import *  # noqa: F401,F403

out_dir = "out-base-12x1-tiny"
n_core = 12
n_loops = 1
