# LT (Looped Transformer, no injection: core input = h_{t-1}), Saunshi et al. 2025.
# Everything else as configs/flt_tiny.py (FLT paper Table 1 CPU twin): only the injection differs.
from configs.flt_tiny import *  # noqa: F401,F403

injection = "none"
out_dir = "out-lt-tiny"
norm_state = True         # the FLT code: h_t = norm(x_t) between loops; LTi adds the raw embedding
