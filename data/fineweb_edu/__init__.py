"""FineWeb-Edu (a download): see prepare.py."""
