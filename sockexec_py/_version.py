"""The single place the version lives (read by pyproject and ``-v``)."""

__version__ = "0.1.0"
