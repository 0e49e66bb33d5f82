# CPU twin of mor_small on the built-in corpus: a 2-block core between a first and a last
# block, recursed up to 3 times with causal expert-choice routing (capacities 1, 2/3, 1/3).
from configs.flt_tiny import *  # noqa: F401,F403

out_dir = "out-mor-tiny"
injection = "none"
n_prelude = 1
n_core = 2
n_coda = 1
n_loops = 3
routing = "mor"
eval_budgets = (1, 2, 3)
from configs._adamw import *  # noqa: F401,F403  (AdamW, warmup, cosine, as before the FLT recipe)
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
