"""wsshm-shard under hostile and failing conditions: planted symlinks, a user's files in --out, inputs
that change after a conversion, read-only and full disks."""
import builtins
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import wsshm.atomic as atomic
import wsshm.shards.writer as writer
from wsshm.atomic import atomic_path, open_no_follow, write_json
from wsshm.shards import read_manifest, shard_paths, verify
from wsshm.shards.cli import main


def pairs(src, n, start=0):
    """``n`` tiny image/mask pairs under ``src/img`` and ``src/msk``."""
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        for folder, array in (("img", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
                              ("msk", np.where(rng.random((8, 8)) > 0.5, 255, 0).astype(np.uint8))):
            (src / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(src / folder / f"s{i:03d}.png")
    return src


def seg(src, out, *extra):
    return main(["seg", "--images", str(src / "img"), "--masks", str(src / "msk"), "--out", str(out),
                 "--no-progress", "--workers", "1", *map(str, extra)])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- item 2: writes cannot be redirected through a planted symlink ---

def test_atomic_write_never_writes_through_a_planted_link(tmp_path):
    victims = {name: tmp_path / f"victim-{name}" for name in ("tmp", "final")}
    for victim in victims.values():
        victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    final = out / "metrics.json"
    (out / f".metrics.json.{os.getpid()}.tmp").symlink_to(victims["tmp"])  # the old, predictable name
    final.symlink_to(victims["final"])
    write_json(final, {"mse": 1.5})
    assert all(v.read_text() == "precious" for v in victims.values())
    assert not final.is_symlink() and json.loads(final.read_text()) == {"mse": 1.5}
    # a failed block leaves neither a temporary nor a new final file
    with pytest.raises(RuntimeError), atomic_path(out / "weights.safetensors") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed half-way")
    assert sorted(p.name for p in out.iterdir()) == [".metrics.json.%d.tmp" % os.getpid(), "metrics.json"]


def test_logs_written_as_they_grow_refuse_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "loss.csv").symlink_to(victim)
    for mode in ("w", "a"):
        with pytest.raises(OSError):
            open_no_follow(tmp_path / "loss.csv", mode)
    assert victim.read_text() == "precious"
    with open_no_follow(tmp_path / "train.log", "w") as log:
        log.write("step 1\n")
    with open_no_follow(tmp_path / "train.log", "a") as log:
        log.write("step 2\n")
    assert (tmp_path / "train.log").read_text() == "step 1\nstep 2\n"


def test_atomic_write_keeps_the_usual_file_mode(tmp_path):
    with atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_conversion_never_writes_through_links_planted_at_its_temporary_names(tmp_path, capsys):
    src, out = pairs(tmp_path / "in", 3), tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    pid = os.getpid()
    planted = [f".seg-000000.tar.partial", f".seg-000000.idx.{pid}.tmp", f".manifest.json.{pid}.tmp",
               f".errors.jsonl.{pid}.tmp", "errors.jsonl"]
    for name in planted:
        (out / name).symlink_to(victim)
    assert seg(src, out) == 0
    assert victim.read_text() == "precious"
    assert all(not p.is_symlink() for p in out.iterdir()) and verify(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["errors.jsonl", "manifest.json", "seg-000000.idx",
                                                     "seg-000000.tar"]
    # a link at a final shard or manifest name is refused, the file it points to untouched
    for name in ("seg-000000.tar", "manifest.json"):
        other = tmp_path / f"fresh-{name}"
        other.mkdir()
        (other / name).symlink_to(victim)
        assert seg(src, other) == 2
        assert str(other / name) in one_error_line(capsys)
        assert victim.read_text() == "precious"


# --- item 4: --overwrite deletes only what wsshm wrote ---

def test_overwrite_never_deletes_a_users_files(tmp_path, capsys):
    src, out = pairs(tmp_path / "in", 4), tmp_path / "out"
    assert seg(src, out, "--maxcount", 2) == 0
    before = sorted(p.name for p in out.iterdir())
    (out / "backup.tar").write_bytes(b"the user's backup")
    (out / "notes.txt").write_text("mine")
    assert seg(src, out, "--maxcount", 3, "--overwrite") == 2
    line = one_error_line(capsys)
    assert str(out / "backup.tar") in line and "not listed" in line
    assert (out / "backup.tar").read_bytes() == b"the user's backup"
    assert sorted(p.name for p in out.iterdir()) == sorted(before + ["backup.tar", "notes.txt"])  # nothing deleted
    (out / "backup.tar").rename(tmp_path / "backup.tar")
    assert seg(src, out, "--maxcount", 3, "--overwrite", "--name", "other") == 0
    assert sorted(p.name for p in out.iterdir()) == ["errors.jsonl", "manifest.json", "notes.txt", "other-000000.idx",
                                                     "other-000000.tar", "other-000001.idx", "other-000001.tar"]
    assert (out / "notes.txt").read_text() == "mine" and verify(out) == []


def test_conversion_refuses_to_replace_files_it_did_not_write(tmp_path, capsys):
    src = pairs(tmp_path / "in", 2)
    cases = {"seg-000000.tar": b"a user's tar", "seg-000003.idx": b"a user's index",
             "manifest.json": b'{"another": "tool"}'}
    for name, data in cases.items():
        out = tmp_path / name
        out.mkdir()
        (out / name).write_bytes(data)
        for extra in ((), ("--overwrite",)):
            assert seg(src, out, *extra) == 2, (name, extra)
            assert str(out / name) in one_error_line(capsys)
            assert [p.name for p in out.iterdir()] == [name] and (out / name).read_bytes() == data


# --- item 10: a finished conversion notices changed inputs ---

def test_new_or_changed_inputs_after_a_finished_conversion_are_refused(tmp_path, capsys):
    src, out = pairs(tmp_path / "in", 8), tmp_path / "out"
    assert seg(src, out) == 0
    capsys.readouterr()
    assert seg(src, out) == 0
    assert "already complete (8 samples in 1 shards)" in capsys.readouterr().out
    pairs(src, 1, start=8)
    assert seg(src, out) == 2
    line = one_error_line(capsys)
    assert str(out) in line and "changed" in line and "--overwrite" in line
    assert read_manifest(out)["count"] == 8
    assert seg(src, out, "--overwrite") == 0 and read_manifest(out)["count"] == 9
    assert seg(src, out) == 0 and "already complete (9 samples" in capsys.readouterr().out
    stat = (src / "msk" / "s004.png").stat()
    os.utime(src / "msk" / "s004.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # an edited label
    assert seg(src, out) == 2 and "changed" in one_error_line(capsys)
    (src / "img" / "s004.png").unlink()
    assert seg(src, out, "--overwrite") == 0 and read_manifest(out)["count"] == 8 and verify(out) == []


def test_an_interrupted_conversion_with_changed_inputs_is_not_resumed(tmp_path, monkeypatch, capsys):
    src, out = pairs(tmp_path / "in", 6), tmp_path / "out"
    real, calls = writer.build_sample, {"n": 0}

    def dies_at_sample_6(*a):
        calls["n"] += 1
        if calls["n"] == 6:  # shards 0 and 1 are finished, shard 2 is open
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(writer, "build_sample", dies_at_sample_6)
    with pytest.raises(KeyboardInterrupt):
        seg(src, out, "--maxcount", 2)
    monkeypatch.setattr(writer, "build_sample", real)
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the open shard was removed
    pairs(src, 1, start=6)  # s006 comes after the last finished shard's key: the old check missed it
    (src / "img" / "s000.png").write_bytes((src / "img" / "s001.png").read_bytes())  # an input already converted
    assert seg(src, out, "--maxcount", 2) == 2 and "changed" in one_error_line(capsys)
    assert seg(src, out, "--maxcount", 2, "--overwrite") == 0
    assert read_manifest(out)["count"] == 7 and verify(out) == []


# --- item 8 (shard part): read-only and full disks ---

def _fail_creating_files_in(monkeypatch, folder, code):
    """A folder where creating a file fails with ``code``, as on a read-only or full file system."""
    real_os_open, real_open = os.open, builtins.open

    def refuse(path):
        if isinstance(path, (str, os.PathLike)) and Path(os.fspath(path)).parent == Path(folder):
            raise OSError(code, os.strerror(code), os.fspath(path))

    def os_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def builtin_open(path, mode="r", *args, **kwargs):
        if set(mode) & set("wxa"):
            refuse(path)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", builtin_open)


def test_read_only_out_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    src, out = pairs(tmp_path / "in", 2), tmp_path / "out"
    out.mkdir()
    if os.geteuid() == 0:  # root writes into a read-only folder anyway: simulate the file system's answer
        _fail_creating_files_in(monkeypatch, out, errno.EACCES)
    else:
        out.chmod(0o555)
    try:
        assert seg(src, out) == 2
    finally:
        out.chmod(0o755)
    line = one_error_line(capsys)
    assert line == f"error: cannot write into {out}: Permission denied"
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("where", ["shard", "index", "manifest"])
def test_full_disk_is_one_line_exit_2_and_a_rerun_finishes(tmp_path, monkeypatch, capsys, where):
    src = pairs(tmp_path / "in", 6)
    assert seg(src, tmp_path / "whole", "--maxcount", 2) == 0
    out = tmp_path / "out"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "shard":  # the disk fills while the second shard is written
        real_open, opened = writer._open_partial, []

        class Full:
            def __init__(self, handle):
                self.handle = handle

            def write(self, data):
                raise full

            def __getattr__(self, name):
                return getattr(self.handle, name)

        def filling(path):
            opened.append(path)
            return Full(real_open(path)) if len(opened) == 2 else real_open(path)

        monkeypatch.setattr(writer, "_open_partial", filling)
    elif where == "index":
        real_index = writer.write_index
        calls = []

        def filling(tar, idx):
            calls.append(idx)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), idx)
            return real_index(tar, idx)

        monkeypatch.setattr(writer, "write_index", filling)
    else:  # the manifest after the second shard
        real_fsync, calls = os.fsync, []

        def filling(fd):
            calls.append(fd)
            if len(calls) == 3:  # the empty manifest, after shard 0, after shard 1
                raise full
            return real_fsync(fd)

        monkeypatch.setattr(atomic.os, "fsync", filling)
    assert seg(src, out, "--maxcount", 2) == 2
    assert one_error_line(capsys) == f"error: cannot write into {out}: No space left on device"
    monkeypatch.undo()
    manifest = json.loads((out / "manifest.json").read_text())  # whole, never half-written
    assert manifest["complete"] is False and [s["name"] for s in manifest["shards"]] == ["seg-000000.tar"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind
    if where != "manifest":
        assert not (out / "seg-000001.tar").exists()  # nothing half-written under a final name
    assert seg(src, out, "--maxcount", 2) == 0
    whole = read_manifest(tmp_path / "whole")
    assert read_manifest(out)["shards"] == whole["shards"] and verify(out) == []
    assert [Path(p).name for p in shard_paths(out)] == [f"seg-00000{i}.tar" for i in range(3)]


def test_a_name_that_is_a_path_is_refused(tmp_path, capsys):
    src, out = pairs(tmp_path / "in", 2), tmp_path / "out"
    for name in ("../escape", "/abs", ".hidden", "a b"):
        assert seg(src, out, "--name", name) == 2
        assert f"--name {name!r}" in one_error_line(capsys)
    assert not (tmp_path / "escape-000000.tar").exists() and not out.exists()
    assert seg(src, out, "--name", "v1.2") == 0 and (out / "v1.2-000000.tar").is_file()


def test_demo_regenerated_with_other_settings_replaces_only_its_own_files(tmp_path):
    from wsshm.shards.demo_data import generate

    tiny = dict(size=32, mattes=1, backgrounds=1, seg=2, eval_natural=1, eval_synthetic=1)
    first = generate(tmp_path, seed=0, **tiny)
    (tmp_path / "seg" / "notes.txt").write_text("mine")
    again = generate(tmp_path, seed=1, **{**tiny, "seg": 3})
    assert read_manifest(again["seg"])["count"] == 3 and verify(again["seg"]) == []
    assert read_manifest(first["matte"])["source"]["seed"] == 1
    assert (tmp_path / "seg" / "notes.txt").read_text() == "mine"
