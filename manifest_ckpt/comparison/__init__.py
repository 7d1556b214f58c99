"""Comparing a checkpoint with a live module: introspection, remapping, the report, diffs."""
