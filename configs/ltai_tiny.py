# LTai (the first layer's attention takes its queries from h_{t-1}), FLT paper's baseline.
# Everything else as configs/flt_tiny.py (FLT paper Table 1 CPU twin): only the injection differs.
from configs.flt_tiny import *  # noqa: F401,F403

injection = "attn_first"
out_dir = "out-ltai-tiny"
