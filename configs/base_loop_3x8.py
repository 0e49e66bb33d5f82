# Base-Loop 3⊗8, the LoopFormer paper's (ICLR 2026) table scale: a 3-block core looped 8 times,
# d=2048, 32 heads, seq 1024, GELU MLP 2.5x wide and tied embeddings as in LoopFormer, GPT-2
# vocab. Training as LoopFormer's code: 50,000 steps of 491,520 tokens (12 x 1024 x 40; 24.6B
# tokens), AdamW lr 6e-4, 2,000 warmup steps, cosine to 6e-5, betas (0.9, 0.95), weight decay
# 0.2, grad clip 1.0. The other rows of the table import this file and change one thing each:
# base_24x1/12x1/6x1, tmlt_3x8, naive_loop_ee_3x8, base_loop_ee_cons_3x8, tmlt_ee_3x8,
# loopformer_3x8. (LoopFormer's positions are learned; ours are RoPE.)
# Data: python data/fineweb_edu/prepare.py --num_shards=460 (LoopFormer used the Pile)
#   torchrun --nproc_per_node=8 train.py --config base_loop_3x8
# CPU twin: --config base_loop_3x8_tiny
dataset = "fineweb_edu"
out_dir = "out-base-loop-3x8"
n_embd = 2048
n_head = 32
n_prelude = 0
n_core = 3
n_coda = 0
n_loops = 8
injection = "none"
mlp = "gelu"
mlp_ratio = 2.5
tie_embeddings = True
block_size = 1024
vocab_size = 50304
batch_size = 12
grad_accum_steps = 40        # 12 x 1024 x 40 = 491,520 tokens per step (global; 1, 2, 4, 8 processes)
max_iters = 50000            # x 491,520 = 24.6B tokens
warmup_iters = 2000
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.2
grad_clip = 1.0
eval_interval = 1000
eval_iters = 20
eval_budgets = (1, 2, 4, 8)
compile = True
