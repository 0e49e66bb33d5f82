# CPU twin of relaxed_small on the built-in corpus: a 2-block stack looped 3 times with a
# rank-8 LoRA per loop on q and v.
from configs.flt_tiny import *  # noqa: F401,F403

out_dir = "out-relaxed-tiny"
injection = "none"
n_loops = 3
lora_rank = 8
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
