"""Fused Triton kernels, installed and imported as ``wsshm.kernels``."""
