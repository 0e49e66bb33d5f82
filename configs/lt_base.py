# LT (Looped Transformer, no injection: core input = h_{t-1}), Saunshi et al. 2025.
# Everything else as configs/flt_base.py (FLT paper Table 1, base size): only the injection differs.
from configs.flt_base import *  # noqa: F401,F403

injection = "none"
out_dir = "out-lt-base"
norm_state = True         # the FLT code: h_t = norm(x_t) between loops; LTi adds the raw embedding
