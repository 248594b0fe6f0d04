"""Benchmarks of the sockexec_py broker against the machine's own limits.

Run ``python -m bench`` (full run), ``python -m bench --quick`` (about a minute) or
``python -m bench --tiny`` (seconds; what the smoke test runs). See :mod:`bench.run`.
"""
