# FLT, the Fully Looped Transformer (every layer's queries from h_{t-1}), FLT paper.
# FLT paper Table 1, small size: depth 6, d = 64 * depth = 384, head dim 128 (3 heads),
# seq 1024, the whole 6-block stack looped 12 times (Table 1's columns: --n_loops=3, 6, 9),
# FineWeb-Edu with the GPT-2 tokenizer, 20 tokens per parameter, bf16, grad clip 1.0.
# Training as the FLT code (a nanochat fork) trains: Muon for the blocks' matrices, AdamW
# for the embedding and the head, no warmup, constant lr then the last 20% linearly to 0.
# One deliberate difference: their wte is stored in bf16 on CUDA; loopgpt keeps fp32 master
# weights and runs the matmuls in bf16 under autocast.
# Data first (~55M tokens a shard): python data/fineweb_edu/prepare.py --num_shards=18
#   torchrun --nproc_per_node=8 train.py --config flt_small
# CPU twin on the built-in corpus: --config flt_tiny
dataset = "fineweb_edu"
out_dir = "out-flt-small"
n_embd = 384
n_head = 3
n_prelude = 0
n_core = 6
n_coda = 0
n_loops = 12
injection = "full_attn"
block_size = 1024
vocab_size = 50304          # GPT-2's 50257 padded to a multiple of 64
# 20 x 49,250,304 params (wte and lm_head once each) // 524,288 tokens = 1878 steps (0.98B tokens)
batch_size = 32
grad_accum_steps = 16       # global; split over the torchrun processes (1, 2, 4, 8, 16)
max_iters = 1878
optimizer = "muon"
muon_lr = 0.02              # q, k, v, attn out, mlp fc, mlp out; no width scaling
muon_momentum_warmup = 300  # Muon's momentum 0.85 -> 0.95 over the first 300 steps
embedding_lr = 0.2828       # 0.2 x (384/768)^-0.5
head_lr = 0.005657          # 0.004 x (384/768)^-0.5
learning_rate = 0.005657    # AdamW for anything else (FLT has nothing else); the logged lr
beta1 = 0.8
beta2 = 0.95
adam_eps = 1e-10
weight_decay = 0.0
warmup_iters = 0
lr_schedule = "wsd"
wsd_decay_frac = 0.2
min_lr = 0.0
grad_clip = 1.0
eval_interval = 250
eval_iters = 20
eval_budgets = (1, 3, 6, 9, 12)
compile = True              # bf16 autocast is on whenever the device is CUDA
