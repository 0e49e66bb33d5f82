# Base 24⊗1: a plain 24-block GPT, the same compute as 3⊗8 at M = 8.
# Everything else as configs/base_loop_3x8.py. LoopFormer's own "Base 24x1" config file sets
# n_layer=12 (a slip in their config); loopgpt keeps 24 blocks: this row is the same-compute
# baseline, 24 blocks once against 3 blocks 8 times.
from configs.base_loop_3x8 import *  # noqa: F401,F403

out_dir = "out-base-24x1"
n_core = 24
n_loops = 1
