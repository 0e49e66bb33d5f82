# Base-Loop-EE-Cons 3⊗8: Base-Loop plus CE on a random prefix route and consistency MSE(sg(h_full), h_short).
# Everything else as configs/base_loop_3x8_tiny.py (CPU twin, built-in corpus).
from configs.base_loop_3x8_tiny import *  # noqa: F401,F403

out_dir = "out-base-loop-ee-cons-3x8-tiny"
objective = "prefix"
lambda_short = 0.1
lambda_cons = 0.1
