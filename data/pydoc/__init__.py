"""The built-in offline corpus: Python's own pydoc topics (see prepare.py)."""
