"""Synthetic reasoning tasks (see prepare.py)."""
