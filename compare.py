"""
Compare finished runs side by side from their log.jsonl files: the last eval of each.

    python compare.py out-exp/*                   # one row per run directory
    python compare.py out-lt-tiny out-flt-tiny --rms=True

Columns: the run, its injection and train loops L, val loss at the train budget, val loss
at every budget it evaluated, and (with --rms=True, the default) the residual-state RMS
of each loop's output h_t, the FLT paper's stability diagnostic.
"""

import json
import os
import sys

from common import fail, parse_args, print_table

paths = [a for a in sys.argv[1:] if not a.startswith("--")]
args, _ = parse_args([a for a in sys.argv[1:] if a.startswith("--")], {"rms": True}, allow_config=False)
if not paths:
    fail("usage: python compare.py OUT_DIR [OUT_DIR ...]")

rows = []
for path in paths:
    log_path = os.path.join(path, "log.jsonl")
    if not os.path.isfile(log_path):
        fail(f"no {log_path}: is {path} a train.py out_dir?")
    try:
        with open(log_path) as f:
            evals = [r for r in map(json.loads, f) if r.get("type") == "eval"]
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        fail(f"cannot read {log_path} (not train.py's JSON lines?): {e}")
    if not evals:
        fail(f"{log_path} has no eval yet")
    last = evals[-1]
    # the config is in the checkpoint, but the log is enough: the train budget is the
    # number of residual-RMS entries, one per loop
    L = len(last.get("residual_rms", [])) or None
    try:
        budgets = ", ".join(f"M={M}: {r['loss']:.3f}" for M, r in last["val"].items())
        at_L = last["val"].get(str(L), {}).get("loss")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        fail(f"{log_path}: its last eval has no val loss per budget (written by another version?): {e!r}")
    row = [os.path.basename(os.path.normpath(path)), last["step"], L, f"{at_L:.3f}" if at_L else "-", budgets]
    if args["rms"]:
        row.append(" ".join(f"{r:.2f}" for r in last.get("residual_rms", [])))
    rows.append(row)

header = ["run", "step", "L", "val@L", "val loss per budget M"] + (["residual rms h_1..h_L"] if args["rms"] else [])
print(print_table(rows, header))
