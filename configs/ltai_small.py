# LTai (the first layer's attention takes its queries from h_{t-1}), FLT paper's baseline.
# Everything else as configs/flt_small.py (FLT paper Table 1, small size): only the injection differs.
from configs.flt_small import *  # noqa: F401,F403

injection = "attn_first"
out_dir = "out-ltai-small"
