"""``make build`` compiles ``wsshm._C`` only when ``csrc/`` or ``setup.py`` changed."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAMP = ROOT / ".venv" / ".wsshm-built"
COMPILE = "install -q --no-build-isolation --no-deps -e ."


def planned(target: str = "build") -> str:
    return subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not STAMP.exists() or shutil.which("make") is None, reason="not built with make")
def test_a_second_build_does_not_compile_and_a_changed_source_does():
    assert COMPILE not in planned()
    source = ROOT / "csrc" / "bindings.cpp"
    before = source.stat()
    try:
        later = STAMP.stat().st_mtime + 10
        os.utime(source, (later, later))
        assert COMPILE in planned()
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert COMPILE not in planned()
