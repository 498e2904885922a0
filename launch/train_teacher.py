"""Stage 'teacher' of the paper's recipe; run with `deepspeed launch/train_teacher.py --help` (docs/training.md)."""
import sys

from wsshm.train import main

if __name__ == "__main__":
    sys.exit(main("teacher"))
