# CPU twin of parcae_small on the built-in corpus: same layout at d=128, minutes.
# Batch and length as configs/flt_tiny.py; its optimizer settings before the FLT recipe (below).
from configs.flt_tiny import *  # noqa: F401,F403

out_dir = "out-parcae-tiny"
n_prelude = 2
n_core = 2
n_coda = 2
n_loops = 8
injection = "diag"
state_init = "randn_small"        # Parcae: trunc-normal std sqrt(2/(5d)), no sqrt(d)
block_norm = "pre"
loop_sampling = "per_sequence"
bptt_k = 4
from configs._adamw import *  # noqa: F401,F403  (AdamW, warmup, cosine, as before the FLT recipe)
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
# Parcae's model (its code): learnable norm gains, its small init with zero output
# projections and a random C, tied embeddings, RoPE base 5e4, no soft-cap
norm_gains = True
init = "parcae"
tie_embeddings = True
rope_base = 50000.0
softcap = 0.0
