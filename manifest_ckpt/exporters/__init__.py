"""Foreign formats out: checkpoints written in layouts other tools read (Hugging Face ``save_pretrained``)."""
