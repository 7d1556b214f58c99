"""The checkpoint format: manifest model, JSON Schema validation, dtypes, safetensors headers, digests (no torch)."""
