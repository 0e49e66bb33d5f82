# CPU twin of huginn_small on the built-in corpus: same layout at d=128, minutes.
# Batch and length as configs/flt_tiny.py; its optimizer settings before the FLT recipe (below).
from configs.flt_tiny import *  # noqa: F401,F403

out_dir = "out-huginn-tiny"
n_prelude = 2
n_core = 4
n_coda = 2
n_loops = 8
injection = "concat"
state_init = "randn"
# Huginn's block and init, as configs/huginn_small.py
block_norm = "sandwich"
norm_gains = True
init = "huginn"
mlp = "swiglu"
mlp_ratio = 3.39
rope_base = 50000.0
qk_norm = False
tie_embeddings = True
loop_sampling = "poisson_lognormal"
bptt_k = 4
from configs._adamw import *  # noqa: F401,F403  (AdamW, warmup, cosine, as before the FLT recipe)
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
