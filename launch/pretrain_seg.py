"""Stage 'pretrain' of the paper's recipe; run with `deepspeed launch/pretrain_seg.py --help` (docs/training.md)."""
import sys

from wsshm.train import main

if __name__ == "__main__":
    sys.exit(main("pretrain"))
