"""Independent PyTorch transcriptions of the models, for parity tests and the PyTorch benchmark (needs torch)."""
