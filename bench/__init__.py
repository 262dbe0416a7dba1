"""Benchmarks of lowlevel against the alternatives (``python -m bench``)."""
