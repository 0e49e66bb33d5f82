# FLTres (x = norm(x + h_{t-1}) before every layer), FLT paper.
# Everything else as configs/flt_tiny.py (FLT paper Table 1 CPU twin): only the injection differs.
from configs.flt_tiny import *  # noqa: F401,F403

injection = "full_res"
out_dir = "out-fltres-tiny"
