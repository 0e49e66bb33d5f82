"""Dataset preparation: each data/<name>/prepare.py writes train.bin, val.bin and meta.json into its folder."""
