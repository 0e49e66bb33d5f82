# LTi (input injection: core input = norm(e + h_{t-1})), Yang et al. 2024.
# Everything else as configs/flt_small.py (FLT paper Table 1, small size): only the injection differs.
from configs.flt_small import *  # noqa: F401,F403

injection = "add"
out_dir = "out-lti-small"
norm_state = True         # the FLT code: h_t = norm(x_t) between loops; LTi adds the raw embedding
