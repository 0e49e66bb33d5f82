"""
Write a loopgpt checkpoint as config.json + model.safetensors, the files a Hugging Face model
repository holds, so that others load it with --init_from=hf:OWNER/NAME (after uploading the
folder) or hf:FOLDER, in sample.py, eval.py and train.py.

    python export.py --out_dir=out --to=out/hf                 # loopgpt's layout: any model, bit for bit
    python export.py --out_dir=out-base --to=llama --layout=llama   # a plain stack as LlamaForCausalLM

layout=loopgpt keeps loopgpt's model keys (config.json's "loopgpt" block) and tensor names;
layout=llama writes a plain stack (n_loops=1, Llama's block: gains, SwiGLU, no QK-norm or
soft-cap) in the layout the transformers library reads. Both keep the training tokenizer in
config.json ("loopgpt_tokenizer"), which --init_from=hf: reads back.
"""

import os
import sys

import torch

from configs import fail, parse_args
from loopgpt import load_checkpoint, model_from_checkpoint, summary
from data.huggingface import export


def main():
    defaults = dict(
        out_dir="out",       # the checkpoint to export (out_dir/ckpt.pt)
        to="",               # the folder to write (created)
        layout="loopgpt",    # loopgpt (any model) | llama (a plain stack, for transformers)
        dtype="float32",     # float32 | bfloat16 (half the size; what the hub's models use)
    )
    args, _ = parse_args(sys.argv[1:], defaults, allow_config=False)
    if not args["to"]:
        fail("--to=FOLDER: where to write config.json and model.safetensors")
    if args["dtype"] not in ("float32", "bfloat16"):
        fail(f"--dtype={args['dtype']} (valid: float32, bfloat16)")
    try:
        ckpt = load_checkpoint(os.path.join(args["out_dir"], "ckpt.pt"))
        model = model_from_checkpoint(ckpt).to(getattr(torch, args["dtype"]))
        export(model, args["to"], layout=args["layout"], tokenizer=ckpt["data_meta"].get("tokenizer"))
    except (ValueError, OSError) as e:
        fail(str(e))
    size = os.path.getsize(os.path.join(args["to"], "model.safetensors"))
    print(f"{args['out_dir']}/ckpt.pt ({summary(model)}) -> {args['to']}/config.json, model.safetensors "
          f"({size / 2**20:.1f} MiB, {args['layout']} layout, {args['dtype']})")
    print(f"read it back: python sample.py --init_from=hf:{args['to']}")


if __name__ == "__main__":
    main()
