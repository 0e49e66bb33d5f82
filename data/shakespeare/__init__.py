"""Tiny Shakespeare (a download): see prepare.py."""
