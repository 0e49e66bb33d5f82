# FLTres (x = norm(x + h_{t-1}) before every layer), FLT paper.
# Everything else as configs/flt_small.py (FLT paper Table 1, small size): only the injection differs.
from configs.flt_small import *  # noqa: F401,F403

injection = "full_res"
out_dir = "out-fltres-small"
