"""Benchmarks for manifest-ckpt (not part of the installed package); run ``python -m benchmarks.run``."""
