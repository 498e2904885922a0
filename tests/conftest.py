"""Fixtures shared by the test files that start multi-process runs."""
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
