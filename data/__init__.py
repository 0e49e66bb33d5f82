"""Data: the tokenizer (tokenizer.py), and each data/<name>/prepare.py, which writes train.bin, val.bin and meta.json into its folder."""
