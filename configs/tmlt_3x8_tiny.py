# TMLT 3⊗8: each loop conditioned on its index (LoopFormer's baseline), final loss only.
# Everything else as configs/base_loop_3x8_tiny.py (CPU twin, built-in corpus).
from configs.base_loop_3x8_tiny import *  # noqa: F401,F403

out_dir = "out-tmlt-3x8-tiny"
modulation = "tmlt"
