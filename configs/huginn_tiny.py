# CPU twin of huginn_small on the built-in corpus: same layout at d=128, minutes.
# Training settings as configs/flt_tiny.py.
from configs.flt_tiny import *  # noqa: F401,F403

out_dir = "out-huginn-tiny"
n_prelude = 2
n_core = 4
n_coda = 2
n_loops = 8
injection = "concat"
state_init = "randn"
block_norm = "pre"          # see configs/huginn_small.py
loop_sampling = "poisson_lognormal"
bptt_k = 4
