# Naive-Loop-EE 3⊗8: Base-Loop plus CE on a random prefix route (first S loops), no consistency term.
# Everything else as configs/base_loop_3x8_tiny.py (CPU twin, built-in corpus).
from configs.base_loop_3x8_tiny import *  # noqa: F401,F403

out_dir = "out-naive-loop-ee-3x8-tiny"
objective = "prefix"
lambda_short = 0.1
lambda_cons = 0.0
