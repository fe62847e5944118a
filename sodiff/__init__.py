"""SODiff: a PyTorch reference of one-step, semantic-oriented diffusion for JPEG artifact removal."""
__version__ = "0.1.0"
