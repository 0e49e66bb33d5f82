# FLTres (x = norm(x + h_{t-1}) before every layer), FLT paper.
# Everything else as configs/flt_base.py (FLT paper Table 1, base size): only the injection differs.
from configs.flt_base import *  # noqa: F401,F403

injection = "full_res"
out_dir = "out-fltres-base"
