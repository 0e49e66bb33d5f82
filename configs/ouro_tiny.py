# CPU twin of ouro_small on the built-in corpus: a 2-block stack looped 4 times with an exit
# gate, stage 1; then --gate_stage=2 --resume=True --max_iters=400 for stage 2.
from configs.flt_tiny import *  # noqa: F401,F403

out_dir = "out-ouro-tiny"
injection = "none"
n_loops = 4
exit_gate = True
norm_state = True           # Ouro's code norms every loop's output and feeds that to the next loop, gate and head
gate_stage = 1
gate_beta = 0.1
eval_budgets = (1, 2, 3, 4)
from configs._adamw import *  # noqa: F401,F403  (AdamW, warmup, cosine, as before the FLT recipe)
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
