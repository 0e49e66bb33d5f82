# FLT, the Fully Looped Transformer (every layer's queries from h_{t-1}), FLT paper.
# FLT paper Table 1, base size: depth 12, d = 64 * depth = 768, head dim 128 (6 heads),
# seq 1024, the whole 12-block stack looped 12 times (Table 1's columns: --n_loops=3, 6, 9),
# FineWeb-Edu with the GPT-2 tokenizer, 20 tokens per parameter, bf16, grad clip 1.0.
# Training as configs/flt_small.py (the FLT code's recipe), its AdamW lrs at d=768.
# Data first (~55M tokens a shard): python data/fineweb_edu/prepare.py --num_shards=59
#   torchrun --nproc_per_node=8 train.py --config flt_base
# CPU twin on the built-in corpus: --config flt_tiny
from configs.flt_small import *  # noqa: F401,F403

out_dir = "out-flt-base"
n_embd = 768
n_head = 6
n_core = 12
# 20 x 162,201,600 params (wte and lm_head once each) // 524,288 tokens = 6187 steps (3.24B tokens)
batch_size = 8              # 144 effective layers of activations: keep micro-batches small
grad_accum_steps = 64       # global; split over the torchrun processes (1, 2, 4, 8, 16)
max_iters = 6187
embedding_lr = 0.2          # 0.2 x (768/768)^-0.5
head_lr = 0.004             # 0.004 x (768/768)^-0.5
learning_rate = 0.004       # AdamW for anything else (FLT has nothing else); the logged lr
