"""wsshm-shard: round trips per kind, normalisation, broken inputs, kill-and-rerun, subsets, verify."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from wsshm.shards import (ShardFolderError, check_folder, index_paths, read_manifest, read_samples, select_subset,
                          shard_paths, verify)
from wsshm.shards.layout import split_member
from wsshm.shards.reader import scan_tar
from wsshm.shards.cli import main

ROOT = Path(__file__).resolve().parents[1]


def rgb(h=24, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def grey(h=24, w=32, seed=0, values=None):
    g = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    return g if values is None else np.where(g > 127, values[1], values[0]).astype(np.uint8)


def save(path, array, fmt=None, **kw):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **kw)
    return path


def samples_of(folder):
    """key -> members, read back with webdataset's own tar reader."""
    ds = wds.WebDataset(shard_paths(folder), shardshuffle=False)
    return {s["__key__"]: s for s in ds}


def decode(data):
    return np.asarray(Image.open(io.BytesIO(data)))


def run(*argv):
    """The converting sub-commands, quietly, on one worker."""
    return main([*map(str, argv), "--no-progress", "--workers", "1"])


def test_seg_round_trip_keeps_valid_bytes_and_matches_case_insensitive_names(tmp_path):
    src = tmp_path / "in"
    paths = {
        "a": (save(src / "img" / "a.jpg", rgb(seed=1), "JPEG", quality=90), save(src / "msk" / "a.png", grey(values=(0, 255)))),
        "sub/b_2": (save(src / "img" / "sub" / "b.2.PNG", rgb(seed=2), "PNG"),
                    save(src / "msk" / "sub" / "b.2.png", grey(seed=2, values=(0, 255)))),
        "c": (save(src / "img" / "c.JPEG", rgb(seed=3), "JPEG"), save(src / "msk" / "c.PNG", grey(seed=3, values=(0, 255)))),
    }
    (src / "img" / "notes.txt").write_text("not an image, and not pretending to be one")
    assert run("seg", "--images", src / "img", "--masks", src / "msk", "--out", tmp_path / "out", "--maxcount", 2) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["count"] == 3 and [s["count"] for s in manifest["shards"]] == [2, 1]
    assert [Path(p).name for p in shard_paths(tmp_path / "out")] == ["seg-000000.tar", "seg-000001.tar"]
    assert all(Path(p).is_file() for p in index_paths(tmp_path / "out"))
    assert manifest["normalised"]["count"] == 0 and manifest["ignored_files"] == 1
    got = samples_of(tmp_path / "out")
    assert sorted(got) == sorted(paths)
    for key, (image, mask) in paths.items():
        ext = "png" if image.suffix.lower() == ".png" else "jpg"
        assert got[key][ext] == image.read_bytes()  # stored as they were, no re-encoding
        assert got[key]["mask.png"] == mask.read_bytes()
        meta = json.loads(got[key]["json"])
        assert meta == {"source": image.relative_to(src / "img").as_posix(), "width": 32, "height": 24}
    assert verify(tmp_path / "out") == []
    assert (tmp_path / "out" / "errors.jsonl").read_text() == ""


def test_matte_background_and_eval_round_trips(tmp_path):
    src = tmp_path / "in"
    fg = save(src / "fg" / "p1.png", rgb(seed=4), "PNG")
    alpha = save(src / "alpha" / "p1.png", grey(seed=4), "PNG")
    bg = save(src / "bg" / "x.jpg", rgb(seed=5), "JPEG")
    ev = [save(src / "ev" / f"e{i}.jpg", rgb(seed=10 + i), "JPEG") for i in range(2)]
    ev_alpha = [save(src / "eva" / f"e{i}.png", grey(seed=10 + i), "PNG") for i in range(2)]
    trimap = save(src / "tri" / "e1.png", grey(seed=1, values=(0, 128)), "PNG")  # only e1 has one
    assert run("matte", "--fg", src / "fg", "--alpha", src / "alpha", "--out", tmp_path / "m") == 0
    assert run("background", "--images", src / "bg", "--out", tmp_path / "b") == 0
    assert run("eval", "--images", src / "ev", "--alphas", src / "eva", "--trimaps", src / "tri", "--out", tmp_path / "e") == 0
    m, b, e = samples_of(tmp_path / "m"), samples_of(tmp_path / "b"), samples_of(tmp_path / "e")
    assert m["p1"]["fg.png"] == fg.read_bytes() and m["p1"]["alpha.png"] == alpha.read_bytes()
    assert b["x"]["jpg"] == bg.read_bytes() and {k for k in b["x"] if not k.startswith("__")} == {"jpg", "json"}
    assert e["e0"]["jpg"] == ev[0].read_bytes() and e["e1"]["alpha.png"] == ev_alpha[1].read_bytes()
    assert "trimap.png" not in e["e0"] and e["e1"]["trimap.png"] == trimap.read_bytes()
    for folder, kind in ((tmp_path / "m", "matte"), (tmp_path / "b", "background"), (tmp_path / "e", "eval")):
        assert read_manifest(folder)["kind"] == kind and verify(folder) == []


def test_rgba_cutouts_are_split_into_fg_and_alpha(tmp_path):
    rgba = np.dstack([rgb(seed=6), grey(seed=6)])
    save(tmp_path / "cut" / "c.png", rgba, "PNG")
    assert run("matte", "--rgba", tmp_path / "cut", "--out", tmp_path / "m") == 0
    sample = samples_of(tmp_path / "m")["c"]
    np.testing.assert_array_equal(decode(sample["fg.png"]), rgba[..., :3])
    np.testing.assert_array_equal(decode(sample["alpha.png"]), rgba[..., 3])
    assert read_manifest(tmp_path / "m")["normalised"] == {"count": 1, "reasons": {"rgba cut-out split": 1}}


def test_other_formats_are_normalised_once_and_counted(tmp_path):
    src, image = tmp_path / "in", rgb(seed=7)
    save(src / "img" / "webp.webp", image, "WEBP", lossless=True)
    save(src / "img" / "bmp.bmp", image, "BMP")
    save(src / "img" / "tiff.tiff", image, "TIFF")
    cv2.imwrite(str(src / "img" / "png16.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    Image.fromarray(image).convert("P", palette=Image.ADAPTIVE, colors=256).save(src / "img" / "palette.png")
    save(src / "img" / "rgba.png", np.dstack([image, grey(seed=7)]), "PNG")
    Image.fromarray(image).convert("CMYK").save(src / "img" / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.fromarray(image).save(src / "img" / "rotated.jpg", quality=95, exif=exif)
    alpha = grey(seed=8)
    for name in ("webp", "bmp", "tiff", "png16", "palette", "rgba", "cmyk"):
        save(src / "alpha" / f"{name}.png", alpha, "PNG")
    save(src / "alpha" / "rotated.png", alpha.T.copy(), "PNG")  # labels follow the displayed orientation
    save(src / "alpha" / "tiff.png", alpha.astype(np.uint16) * 257, "PNG")  # 16-bit alpha
    (src / "alpha" / "bmp.png").unlink()
    save(src / "alpha" / "bmp.png", np.dstack([alpha, alpha, alpha]), "PNG")  # RGB alpha
    assert run("matte", "--fg", src / "img", "--alpha", src / "alpha", "--out", tmp_path / "m") == 0
    manifest = read_manifest(tmp_path / "m")
    assert manifest["count"] == 8 and manifest["errors"] == 0 and manifest["normalised"]["count"] == 8
    assert manifest["normalised"]["reasons"]["exif-rotated jpeg"] == 1 and manifest["normalised"]["reasons"]["cmyk jpeg"] == 1
    got = samples_of(tmp_path / "m")
    for key in ("webp", "bmp", "tiff", "png16", "rgba"):
        np.testing.assert_array_equal(decode(got[key]["fg.png"]), image, err_msg=key)
    for key in ("webp", "bmp", "tiff"):
        np.testing.assert_array_equal(decode(got[key]["alpha.png"]), alpha, err_msg=key)
    assert decode(got["rotated"]["fg.png"]).shape == (32, 24, 3)
    assert np.abs(decode(got["cmyk"]["fg.png"]).astype(int) - image).mean() < 12
    assert verify(tmp_path / "m") == []


@pytest.fixture
def broken_inputs(tmp_path):
    src = tmp_path / "in"
    good = [save(src / "img" / f"good{i}.jpg", rgb(seed=i), "JPEG") for i in range(3)]
    for i in range(3):
        save(src / "msk" / f"good{i}.png", grey(seed=i, values=(0, 255)))
    full = (src / "img" / "good0.jpg").read_bytes()
    cases = {
        "truncated.jpg": "truncated",
        "empty.jpg": "empty file",
        "text.png": "not an image",
        "badsize.jpg": "differs from its image",
        "orphan.jpg": "without a partner",
        "bomb.png": "decompression bomb",
        "unreadable.jpg": "unreadable",
    }
    (src / "img" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (src / "img" / "empty.jpg").write_bytes(b"")
    (src / "img" / "text.png").write_text("hello, I am text")
    save(src / "img" / "badsize.jpg", rgb(seed=9), "JPEG")
    save(src / "img" / "orphan.jpg", rgb(seed=9), "JPEG")
    save(src / "img" / "bomb.png", np.zeros((300, 300, 3), np.uint8), "PNG")
    (src / "img" / "unreadable.jpg").symlink_to(src / "does-not-exist.jpg")
    for name in ("truncated", "empty", "text", "unreadable"):
        save(src / "msk" / f"{name}.png", grey(values=(0, 255)))
    save(src / "msk" / "bomb.png", np.zeros((300, 300), np.uint8))
    save(src / "msk" / "badsize.png", grey(h=10, w=10, values=(0, 255)))
    save(src / "msk" / "lonely.png", grey(values=(0, 255)))
    cases["lonely.png"] = "without an image"
    return src, good, cases


def test_broken_files_are_reported_and_the_rest_converted(tmp_path, broken_inputs, capsys):
    src, good, cases = broken_inputs
    out = tmp_path / "out"
    assert run("seg", "--images", src / "img", "--masks", src / "msk", "--out", out, "--max-pixels", 50_000) == 0
    assert "warning: 9 input(s) rejected" in capsys.readouterr().err  # the bomb's mask is one too
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    by_name = {Path(e["path"]).name: e["reason"] for e in errors}
    for name, reason in cases.items():
        path_name = "badsize.png" if name == "badsize.jpg" else name
        assert reason in by_name[path_name], (name, by_name)
    assert "decompression bomb" in by_name["bomb.png"] and len(errors) == len(cases) + 1
    assert sorted(samples_of(out)) == ["good0", "good1", "good2"]
    assert read_manifest(out)["errors"] == len(errors) and verify(out) == []


def test_on_error_fail_writes_no_shards(tmp_path, broken_inputs, capsys):
    src, _, cases = broken_inputs
    out = tmp_path / "out"
    assert run("seg", "--images", src / "img", "--masks", src / "msk", "--out", out, "--on-error", "fail") == 2
    assert "nothing converted" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["errors.jsonl"]
    assert len((out / "errors.jsonl").read_text().splitlines()) == len(cases) - 1  # the bomb is under the default limit


def test_nothing_convertible_exits_nonzero(tmp_path, capsys):
    (tmp_path / "img").mkdir(), (tmp_path / "msk").mkdir()
    (tmp_path / "img" / "a.jpg").write_text("not a picture")
    save(tmp_path / "msk" / "a.png", grey(values=(0, 255)))
    assert run("seg", "--images", tmp_path / "img", "--masks", tmp_path / "msk", "--out", tmp_path / "out") == 2
    assert "no sample could be converted" in capsys.readouterr().err
    assert read_manifest(tmp_path / "out")["count"] == 0 and not list((tmp_path / "out").glob("*.tar"))


def _folder(tmp_path, n=40):
    src = tmp_path / "in"
    for i in range(n):
        save(src / "img" / f"s{i:03d}.png", rgb(8, 8, seed=i), "PNG")
        save(src / "msk" / f"s{i:03d}.png", grey(8, 8, seed=i, values=(0, 255)), "PNG")
    (src / "img" / "s007.png").write_bytes(b"broken")
    return src


def test_interrupted_run_resumes_to_the_same_shards(tmp_path, monkeypatch):
    src = _folder(tmp_path)
    args = ["seg", "--images", src / "img", "--masks", src / "msk", "--maxcount", 6]
    assert run(*args, "--out", tmp_path / "whole") == 0
    import wsshm.shards.writer as writer

    real, calls = writer.build_sample, {"n": 0}

    def dies_at_sample_20(*a):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt  # the process is stopped in the middle of a shard
        return real(*a)

    monkeypatch.setattr(writer, "build_sample", dies_at_sample_20)
    with pytest.raises(KeyboardInterrupt):
        run(*args, "--out", tmp_path / "cut")
    monkeypatch.setattr(writer, "build_sample", real)
    cut = tmp_path / "cut"
    with pytest.raises(ShardFolderError, match="did not finish"):
        read_manifest(cut)
    finished = json.loads((cut / "manifest.json").read_text())["shards"]
    assert len(finished) == 2 and not list(cut.glob("seg-000002*"))  # the third, full but open, is not there
    assert run(*args, "--out", cut) == 0
    whole, resumed = read_manifest(tmp_path / "whole"), read_manifest(cut)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in whole["shards"]]
    assert resumed["count"] == 39 and resumed["errors"] == 1
    assert (cut / "errors.jsonl").read_text() == (tmp_path / "whole" / "errors.jsonl").read_text()
    assert not [p for p in cut.iterdir() if p.name.startswith(".")]
    assert run(*args, "--out", cut) == 0  # a finished folder is left alone


def test_killed_process_leaves_no_partial_shard_and_rerun_finishes(tmp_path):
    src = _folder(tmp_path, n=60)
    out = tmp_path / "out"
    args = ["seg", "--images", str(src / "img"), "--masks", str(src / "msk"), "--out", str(out), "--maxcount", "5",
            "--workers", "1", "--no-progress"]
    slow = ("import sys, time, wsshm.shards.writer as w; real = w.build_sample\n"
            "def slow(*a):\n    time.sleep(0.03)\n    return real(*a)\n"
            "w.build_sample = slow\nfrom wsshm.shards.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", slow, *args], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        manifest = out / "manifest.json"
        if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = {s["name"] for s in json.loads((out / "manifest.json").read_text())["shards"]}
    assert 2 <= len(listed) < 12
    for tar in out.glob("*.tar"):  # every tar under a final name is whole
        with tarfile.open(tar) as t:
            assert len(t.getnames()) % 3 == 0
    assert main(args) == 0
    assert read_manifest(out)["count"] == 59 and verify(out) == []


def test_select_subset_is_deterministic_nested_and_order_free():
    keys = [f"k{i}" for i in range(500)]
    a = select_subset(keys, 50, seed=1)
    assert a == select_subset(keys, 50, seed=1) and len(a) == 50
    assert sorted(select_subset(list(reversed(keys)), 50, seed=1)) == sorted(a)
    assert set(a) <= set(select_subset(keys, 200, seed=1))
    assert set(a) != set(select_subset(keys, 50, seed=2))
    assert a == [k for k in keys if k in set(a)]  # input order kept
    assert select_subset(keys, None, 0) == keys
    with pytest.raises(ValueError, match="only 500"):
        select_subset(keys, 501, 0)


def test_limit_converts_the_subset_rule_keys(tmp_path):
    src = _folder(tmp_path, n=20)
    (src / "img" / "s007.png").unlink()
    (src / "msk" / "s007.png").unlink()
    for out in ("a", "b"):
        assert run("seg", "--images", src / "img", "--masks", src / "msk", "--out", tmp_path / out,
                   "--limit", 5, "--seed", 3) == 0
    keys = [f"s{i:03d}" for i in range(20) if i != 7]
    assert sorted(samples_of(tmp_path / "a")) == select_subset(keys, 5, 3)
    assert read_manifest(tmp_path / "a")["shards"][0]["sha256"] == read_manifest(tmp_path / "b")["shards"][0]["sha256"]


def test_verify_finds_damage_and_cli_exits_nonzero(tmp_path, capsys):
    src = _folder(tmp_path, n=6)
    out = tmp_path / "out"
    assert run("seg", "--images", src / "img", "--masks", src / "msk", "--out", out, "--maxcount", 3) == 0
    assert main(["verify", str(out)]) == 0
    tar = Path(shard_paths(out)[1])
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # inside the first member's bytes
    tar.write_bytes(bytes(data))
    Path(index_paths(out)[0]).unlink()
    problems = verify(out)
    assert any("sha256 differs" in p for p in problems) and any("index missing" in p for p in problems)
    assert main(["verify", str(out)]) == 1
    assert verify(tmp_path) == [f"{tmp_path / 'manifest.json'}: no manifest (not a shard folder, or a conversion that "
                                "never started)"]


def test_check_folder_refuses_unusable_folders_in_one_line(tmp_path):
    src = _folder(tmp_path, n=6)
    out = tmp_path / "out"
    assert run("seg", "--images", src / "img", "--masks", src / "msk", "--out", out, "--maxcount", 3) == 0
    assert check_folder(out, "seg", 6)["count"] == 6 and check_folder(out)["kind"] == "seg"
    cases = [((None, "seg"), "no seg shard folder given"), ((tmp_path / "nowhere",), "shard folder not found"),
             ((src,), "no manifest"), ((out, "matte"), "holds 'seg' shards where 'matte' shards are needed"),
             ((out, "seg", 7), "holds 6 samples; cannot select 7"), ((out, "seg", 0), "cannot select 0")]
    (tmp_path / "none" / "img").mkdir(parents=True)
    (tmp_path / "none" / "img" / "a.jpg").write_text("not a picture")
    save(tmp_path / "none" / "msk" / "a.png", grey(values=(0, 255)))
    assert run("seg", "--images", tmp_path / "none" / "img", "--masks", tmp_path / "none" / "msk",
               "--out", tmp_path / "empty") == 2
    cases.append(((tmp_path / "empty",), "holds no samples"))
    for args, message in cases:
        with pytest.raises(ShardFolderError, match=message) as error:
            check_folder(*args)
        assert "\n" not in str(error.value) and (args[0] is None or str(args[0]) in str(error.value))
    Path(shard_paths(out)[1]).unlink()
    with pytest.raises(ShardFolderError, match="shard file missing: .*seg-000001.tar"):
        check_folder(out, "seg")


def test_one_reader_reads_index_and_tar_alike_and_names_what_breaks_the_layout(tmp_path):
    src = _folder(tmp_path, n=5)
    out = tmp_path / "out"
    assert run("seg", "--images", src / "img", "--masks", src / "msk", "--out", out) == 0
    tar = shard_paths(out)[0]
    from_index, (scanned, oddities) = read_samples(tar), scan_tar(tar)
    assert [(s.key, s.members) for s in from_index] == [(s.key, s.members) for s in scanned] and not oddities
    assert [s.key for s in scanned] == [f"s{i:03d}" for i in range(5)] and set(scanned[0].members) == {
        "png", "mask.png", "json"}
    assert scanned[2].read("png") == (src / "img" / "s002.png").read_bytes()
    assert split_member("dir.v2/a.fg.png") == ("dir.v2/a", "fg.png") and split_member("a") == ("a", "")
    odd = tmp_path / "odd.tar"
    with tarfile.open(odd, "w") as t:
        for name in ("a.jpg", "b.jpg", "a.mask.png", "a.mask.png", "noext"):
            info = tarfile.TarInfo(name)
            info.size = 1
            t.addfile(info, io.BytesIO(b"x"))
        t.addfile(_dir_entry("sub"))
    samples, oddities = scan_tar(str(odd))
    assert [s.key for s in samples] == ["a", "b"]
    assert [o.split(": ", 1)[1] for o in oddities] == [
        "the members of a are not adjacent", "a.mask.png appears twice",
        "noext is not a sample member (no key or no extension)", "sub is not a regular file"]


def _dir_entry(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_cli_refuses_unclear_requests(tmp_path, capsys):
    src = _folder(tmp_path, n=3)
    assert run("matte", "--fg", src / "img", "--out", tmp_path / "m") == 2
    assert "either --fg and --alpha, or --rgba" in capsys.readouterr().err
    assert run("seg", "--images", src / "nope", "--masks", src / "msk", "--out", tmp_path / "s") == 2
    assert "image folder not found" in capsys.readouterr().err
    assert run("seg", "--images", src / "img", "--masks", src / "msk", "--out", tmp_path / "s") == 0
    assert run("seg", "--images", src / "img", "--masks", src / "msk", "--out", tmp_path / "s", "--maxcount", 1) == 2
    assert "different conversion" in capsys.readouterr().err
    assert run("seg", "--images", src / "img", "--masks", src / "msk", "--out", tmp_path / "s", "--maxcount", 1,
               "--name", "other", "--overwrite") == 0
    assert [Path(p).name for p in shard_paths(tmp_path / "s")] == [f"other-00000{i}.tar" for i in range(3)]
    assert verify(tmp_path / "s") == []  # the replaced conversion's shards are gone


def test_parallel_workers_write_the_same_shards(tmp_path):
    src = _folder(tmp_path, n=24)
    for workers, out in ((1, "one"), (2, "two")):
        assert main(["seg", "--images", str(src / "img"), "--masks", str(src / "msk"), "--out", str(tmp_path / out),
                     "--workers", str(workers), "--maxcount", "10", "--no-progress"]) == 0
    assert read_manifest(tmp_path / "one")["shards"] == read_manifest(tmp_path / "two")["shards"]
