"""Evaluation downloads (the DCLM eval bundle, WikiText-2): prepare.py."""
