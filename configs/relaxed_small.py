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
from configs._adamw import *  # noqa: F401,F403  (AdamW, warmup, cosine, as before the FLT recipe)
learning_rate = 0.001
min_lr = 0.0001
warmup_iters = 100
