"""Foreign formats in: torch.save pickles (read without executing them), Lightning, DDP, Hugging Face files."""
