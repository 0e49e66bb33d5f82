# CPU twin of parcae_small on the built-in corpus: same layout at d=128, minutes.
# Training settings as configs/flt_tiny.py.
from configs.flt_tiny import *  # noqa: F401,F403

out_dir = "out-parcae-tiny"
n_prelude = 2
n_core = 2
n_coda = 2
n_loops = 8
injection = "diag"
state_init = "randn"
block_norm = "pre"
loop_sampling = "per_sequence"
bptt_k = 4
