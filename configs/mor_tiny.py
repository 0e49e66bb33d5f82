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
# training as before flt_tiny took the FLT code's recipe (Muon, wsd): AdamW, warmup, cosine
optimizer = "adamw"
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
lr_schedule = "cosine"
weight_decay = 0.1
beta1 = 0.9
adam_eps = 1e-8
embedding_lr = 0.0
head_lr = 0.0
