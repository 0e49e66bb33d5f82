# Uptraining: a looped 1 + 2⊗3 + 1 initialised from a trained plain 8-block model (configs/base.py)
# and trained on, as Relaxed Recursive Transformers (Bae et al. 2025, arXiv 2410.20672) convert
# a pretrained model: the 6 middle layers become one 2-block core looped 3 times.
#   python train.py --config base --out_dir=out-base
#   python train.py --config uptrain_tiny --init_from=out-base --out_dir=out-up
# --init_core=lower|stepwise|average (what the core starts as); --lora_rank=8 adds a per-loop
# LoRA on q and v initialised from the SVD of what the shared core misses (Relaxed's).
from configs.tiny import *  # noqa: F401,F403

out_dir = "out-up"
init_from = "out-base"
init_core = "average"
n_prelude = 1
n_core = 2
n_coda = 1
n_loops = 3
injection = "none"           # the loop reads the raw stream, as the source's layers did
max_iters = 200
