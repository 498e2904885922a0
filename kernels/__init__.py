"""Fused Triton kernels, installed and imported as ``wsshm.kernels``.

``fused_teacher_loss`` and ``fused_student_loss`` equal ``wsshm.losses.teacher_loss`` and
``wsshm.losses.student_loss`` and compute their gradient in the same pass over the pixels
(docs/kernels.md).
"""
from .fused import INTERPRET, fused_student_loss, fused_teacher_loss, triton_on_cpu

__all__ = ["fused_teacher_loss", "fused_student_loss", "triton_on_cpu", "INTERPRET"]
