"""wsshm: Weakly Semi-Supervised Human Matting with Matte Label Blending (MLB)."""
# torch must be loaded before the wsshm._C extension, whose symbols live in libc10/libtorch.
import torch  # noqa: F401

__version__ = "0.1.0"
