# Relaxed Recursive Transformer: the shared 6-block stack looped 3 times, with a rank-16
# LoRA per loop on every block's q and v (B zero-initialised: training starts from plain
# weight sharing). d=384, seq 1024, FineWeb-Edu with the GPT-2 tokenizer.
#   torchrun --nproc_per_node=8 train.py --config relaxed_small
from configs.flt_small import *  # noqa: F401,F403

out_dir = "out-relaxed-small"
injection = "none"
n_loops = 3
lora_rank = 16
eval_budgets = (1, 2, 3)
# training as before flt_small took the FLT code's recipe (Muon, wsd): AdamW, warmup, cosine
optimizer = "adamw"
learning_rate = 0.001
min_lr = 0.0001
warmup_iters = 100
lr_schedule = "cosine"
weight_decay = 0.1
beta1 = 0.9
adam_eps = 1e-8
embedding_lr = 0.0
head_lr = 0.0
