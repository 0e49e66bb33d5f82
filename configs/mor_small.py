# Mixture-of-Recursions (Bae et al. 2025), Middle-Cycle: a first and a last block of their
# own, a shared 4-block core recursed up to 3 times, expert-choice routing with capacities
# 1, 2/3, 1/3 (causal variant, see LoopGPT.route), gate g = 0.1 σ(score), BCE aux loss 1e-3.
# d=384 (3 heads of 128), seq 1024, FineWeb-Edu with the GPT-2 tokenizer.
#   torchrun --nproc_per_node=8 train.py --config mor_small
# CPU twin on the built-in corpus: --config mor_tiny
from configs.flt_small import *  # noqa: F401,F403

out_dir = "out-mor-small"
injection = "none"
n_prelude = 1
n_core = 4
n_coda = 1
n_loops = 3
routing = "mor"
eval_budgets = (1, 2, 3)   # a MoR model has a capacity for n_loops recursions, no more
from configs._adamw import *  # noqa: F401,F403  (AdamW, warmup, cosine, as before the FLT recipe)
learning_rate = 0.001
min_lr = 0.0001
warmup_iters = 100
