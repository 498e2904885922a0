"""Fixtures shared by test files: once-per-run folders and locks for multi-process runs, checkpoint comparison."""
import contextlib
import fcntl
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Path:
    """A folder all xdist workers of this run share (the xdist recipe for once-per-run fixtures)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "train-ds"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def one_run_at_a_time(shared):
    """A lock around a run that takes both cores, so that two such runs never share them, even when
    xdist puts their tests on different workers (xdist 3.8 does not keep a group on one worker)."""
    @contextlib.contextmanager
    def lock():
        with open(shared / "ds.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    return lock


def _checkpoint_state(tag_dir: Path) -> dict:
    """Every tensor and number a DeepSpeed checkpoint folder holds, by file and key path."""
    import torch
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{prefix}/{i}", item)
        elif isinstance(value, (torch.Tensor, int, float)):
            flat[prefix] = value

    for file in sorted(tag_dir.glob("*.pt")):
        walk(file.name, torch.load(file, map_location="cpu", weights_only=False))
    return flat


@pytest.fixture
def changed_between_checkpoints():
    """``(changed, compared)``: the keys whose value differs between two checkpoint folders, less the
    counters a step moves even without an update, and every key compared."""
    import torch
    counters = ("global_steps", "global_samples", "skipped_steps", "/overflow", "/wsshm/step", "/loader/")

    def compare(before_dir: Path, after_dir: Path) -> tuple[list[str], list[str]]:
        before, after = _checkpoint_state(before_dir), _checkpoint_state(after_dir)
        assert before.keys() == after.keys()
        compared = [key for key in before if not any(c in key for c in counters)]
        changed = sorted(key for key in compared
                         if not (torch.equal(before[key], after[key]) if isinstance(before[key], torch.Tensor)
                                 else before[key] == after[key]))
        return changed, compared
    return compare
