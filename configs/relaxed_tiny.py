# CPU twin of relaxed_small on the built-in corpus: a 2-block stack looped 3 times with a
# rank-8 LoRA per loop on q and v.
from configs.flt_tiny import *  # noqa: F401,F403

out_dir = "out-relaxed-tiny"
injection = "none"
n_loops = 3
lora_rank = 8
eval_budgets = (1, 2, 3)
from configs._adamw import *  # noqa: F401,F403  (AdamW, warmup, cosine, as before the FLT recipe)
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
