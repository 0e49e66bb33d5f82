# Ouro-style looped LM: the whole stack (no prelude or coda) looped 4 times, with an exit
# gate λ_t after every loop. Stage 1 trains LM and gate together (Σ p_t CE_t - β H(p));
# then stage 2 trains the gate alone:
#   torchrun --nproc_per_node=8 train.py --config ouro_small
#   torchrun --nproc_per_node=8 train.py --config ouro_small --gate_stage=2 --resume=True --max_iters=2200
#   python sample.py --out_dir=out-ouro-small --exit=gate:0.9
# d=384 (3 heads of 128), 6 blocks, seq 1024, FineWeb-Edu with the GPT-2 tokenizer.
from configs.flt_small import *  # noqa: F401,F403

out_dir = "out-ouro-small"
injection = "none"
n_loops = 4
exit_gate = True
norm_state = True           # Ouro's code norms every loop's output and feeds that to the next loop, gate and head
gate_stage = 1
gate_beta = 0.1
eval_budgets = (1, 2, 3, 4)
from configs._adamw import *  # noqa: F401,F403  (AdamW, warmup, cosine, as before the FLT recipe)
learning_rate = 0.001
min_lr = 0.0001
warmup_iters = 100
