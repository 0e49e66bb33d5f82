# LTai (the first layer's attention takes its queries from h_{t-1}), FLT paper's baseline.
# Everything else as configs/flt_base.py (FLT paper Table 1, base size): only the injection differs.
from configs.flt_base import *  # noqa: F401,F403

injection = "attn_first"
out_dir = "out-ltai-base"
