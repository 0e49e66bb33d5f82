# A plain (unlooped) GPT: 8 blocks, each run once. The baseline for configs/base_loop.py:
# same effective depth and compute per token, 4x the block parameters. Training as tiny.
from configs.tiny import *  # noqa: F401,F403

out_dir = "out-base"
n_prelude = 0
n_core = 8
n_coda = 0
n_loops = 1
injection = "none"
