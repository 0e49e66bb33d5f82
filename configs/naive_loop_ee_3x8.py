# Naive-Loop-EE 3⊗8: Base-Loop plus CE on a random prefix route (first S loops), no consistency term.
# Everything else as configs/base_loop_3x8.py. No official reference run: LoopFormer's code
# stops its early-exit runs at once (train.py uses `random` without importing it).
from configs.base_loop_3x8 import *  # noqa: F401,F403

out_dir = "out-naive-loop-ee-3x8"
objective = "prefix"
lambda_short = 0.1
lambda_cons = 0.0
