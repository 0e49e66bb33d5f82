# LoopUS (Park et al. 2026, arXiv 2605.11011): a trained plain 8-block model (configs/base.py)
# recast as encoder (its first layer), a looped reasoning block (its 6 middle layers, all kept:
# the same parameters, more compute per token) and decoder (its last layer), then trained on:
#   python train.py --config base --out_dir=out-base
#   python train.py --config loopus_tiny --init_from=out-base --out_dir=out-loopus
#   python sample.py --out_dir=out-loopus --exit=confidence:0.6    # adaptive depth
# Its four parts here: the split (n_prelude / n_core / n_coda), the selective gate between
# loops, random deep supervision (a uniform random depth per step, gradients through its last
# 2 loops, L_Mono), and the confidence head (L_Q; exit=confidence:q). The embedding and the
# encoder stay as trained (the LoopUS code runs its encoder without gradients).
from configs.tiny import *  # noqa: F401,F403

out_dir = "out-loopus"
init_from = "out-base"
init_core = "lower"          # one loop of 6 blocks: the source's layers 1-6 exactly
n_prelude = 1
n_core = 6
n_coda = 1
n_loops = 3                  # the default budget (eval, sampling); training draws 1..loop_max
injection = "none"           # LoopUS feeds only the gated state back, no input injection
selective_gate = True
confidence_head = True
loop_sampling = "uniform"
loop_min = 1
loop_max = 4
bptt_k = 2                   # the LoopUS code's window: 2 applications of the block with gradient
lambda_mono = 1.0
freeze = "wte,prelude"
sweep_exits = "confidence:0.6"
max_iters = 200
