# Base-Loop, k ⊗ L = 2 ⊗ 4 (Saunshi et al. 2025): a 2-block core looped 4 times, nothing
# else, effective depth 8 like configs/base.py with a quarter of its block parameters.
# Training as tiny.
from configs.tiny import *  # noqa: F401,F403

out_dir = "out-base-loop"
n_prelude = 0
n_core = 2
n_coda = 0
n_loops = 4
injection = "none"
