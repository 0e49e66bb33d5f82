# LoopFormer 3⊗8: time and step-size modulation trained with shortcut-consistency
# CE(full) + 0.1 CE(short) + 0.1 MSE(sg(h_full), h_short) on a random schedule of the 1/L grid.
# Everything else as configs/base_loop_3x8.py.
from configs.base_loop_3x8 import *  # noqa: F401,F403

out_dir = "out-loopformer-3x8"
modulation = "loopformer"
objective = "shortcut"
lambda_short = 0.1
lambda_cons = 0.1
