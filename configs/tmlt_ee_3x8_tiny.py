# TMLT-EE 3⊗8: loop-index conditioning plus the prefix route with consistency.
# Everything else as configs/base_loop_3x8_tiny.py (CPU twin, built-in corpus).
from configs.base_loop_3x8_tiny import *  # noqa: F401,F403

out_dir = "out-tmlt-ee-3x8-tiny"
modulation = "tmlt"
objective = "prefix"
lambda_short = 0.1
lambda_cons = 0.1
