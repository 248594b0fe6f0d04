"""Fuzz harnesses (h11 keeps one too): ``python -m fuzz --help``."""
