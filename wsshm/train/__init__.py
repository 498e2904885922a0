"""Training with DeepSpeed: one engine (``engine.py``) running the paper's three stages
(``stages.py``): segmentation pre-training, the teacher on composites, the student with MLB + EMA."""
from wsshm.train.engine import main

__all__ = ["main"]
