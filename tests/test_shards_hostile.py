"""Hostile and odd shard data (issue 13): manifests naming files outside their folder or links, broken
manifest entries, members and indexes declaring sizes beyond the file, keys the index cannot hold,
shard checksums before training, undecodable members, VOC-style and empty masks, and the largest
image wsshm decodes."""
import io
import json
import os
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsshm.data import build_loader
from wsshm.image import MAX_IMAGE_PIXELS
from wsshm.shards import (CorruptSample, Sample, ShardFolderError, check_checksums, check_folder, decode_sample,
                          open_shard_set, read_manifest, read_samples, shard_paths, verify)
from wsshm.shards.cli import main
from wsshm.shards.images import DEFAULT_MAX_PIXELS, BadInput, load_grey
from wsshm.shards.pairing import pair_folders
from wsshm.shards.reader import decode_image, parse_index
from wsshm.shards.writer import convert, sha256_file, write_index

PIL_DEFAULT_LIMIT = int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's own Image.MAX_IMAGE_PIXELS


def _save(path: Path, array, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def _mask(h=12, w=16, seed=0) -> np.ndarray:
    return np.where(np.random.default_rng(seed).random((h, w)) > 0.5, 255, 0).astype(np.uint8)


def seg_folder(root: Path, n=4, maxcount=1000, masks=None) -> Path:
    """A finished seg shard folder of ``n`` tiny samples (``masks`` replaces some masks: index -> array)."""
    for i in range(n):
        _save(root / "img" / f"s{i}.png", np.random.default_rng(i).integers(0, 256, (12, 16, 3), dtype=np.uint8))
        _save(root / "msk" / f"s{i}.png", (masks or {}).get(i, _mask(seed=i)))
    convert("seg", pair_folders(root / "img", {"mask": root / "msk"}), root / "seg", maxcount=maxcount, progress=False)
    return root / "seg"


def rewrite_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def write_shard(folder: Path, name: str, samples: dict) -> None:
    """Replace shard ``name`` with ``samples`` (key -> {ext: bytes}), written with tarfile as another
    tool might, re-indexed, and its checksum and count put in the manifest."""
    tar_path = folder / name
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    write_index(tar_path, folder / (tar_path.stem + ".idx"))

    def edit(manifest):
        entry = next(e for e in manifest["shards"] if e["name"] == name)
        manifest["count"] += len(samples) - entry["count"]
        entry.update(count=len(samples), sha256=sha256_file(tar_path), bytes=tar_path.stat().st_size)
    rewrite_manifest(folder, edit)


def members_of(folder: Path) -> dict:
    """key -> {ext: bytes} of every sample of a folder."""
    return {s.key: {ext: s.read(ext) for ext in s.members} for p in shard_paths(folder) for s in read_samples(p)}


def one_line(text: str) -> bool:
    return "\n" not in text and len(text) < 400


# -- item 6: manifests, indexes and keys -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../x/seg-000000.tar", "ABSOLUTE", "sub/seg-000000.tar", ".."])
def test_shard_names_outside_the_folder_are_refused(tmp_path, name):
    folder = seg_folder(tmp_path)
    outside = tmp_path / "x" / "seg-000000.tar"  # a real tar where the hostile name points
    outside.parent.mkdir()
    outside.write_bytes((folder / "seg-000000.tar").read_bytes())
    name = str(outside) if name == "ABSOLUTE" else name
    rewrite_manifest(folder, lambda m: m["shards"][0].update(name=name))
    with pytest.raises(ShardFolderError, match="not a plain file name in the folder") as error:
        check_folder(folder, "seg")
    assert one_line(str(error.value)) and str(folder / "manifest.json") in str(error.value)
    with pytest.raises(ShardFolderError, match="not a plain file name"):
        open_shard_set(folder, "seg")
    problems = verify(folder)
    assert len(problems) == 1 and "not a plain file name" in problems[0] and one_line(problems[0])


def test_a_shard_or_index_that_is_a_symbolic_link_is_refused(tmp_path):
    folder = seg_folder(tmp_path)
    tar = folder / "seg-000000.tar"
    elsewhere = tmp_path / "elsewhere.tar"
    tar.rename(elsewhere)
    tar.symlink_to(elsewhere)
    with pytest.raises(ShardFolderError, match=f"{tar}: a symbolic link") as error:
        check_folder(folder, "seg")
    assert one_line(str(error.value))
    assert any(f"{tar}: a symbolic link" in p for p in verify(folder))
    assert check_checksums(folder) == [f"{tar}: a symbolic link, not a shard file (wsshm reads only the files "
                                       "of the folder itself)"]
    tar.unlink()
    elsewhere.rename(tar)
    idx = folder / "seg-000000.idx"
    idx.rename(tmp_path / "elsewhere.idx")
    idx.symlink_to(tmp_path / "elsewhere.idx")
    with pytest.raises(ShardFolderError, match=f"{idx}: a symbolic link"):
        open_shard_set(folder, "seg")
    assert any(f"{idx}: a symbolic link" in p for p in verify(folder))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["shards"][0].pop("sha256"), "shard entry 0 lacks sha256"),
    (lambda m: m["shards"].__setitem__(0, "seg-000000.tar"), "shard entry 0 is not an object"),
    (lambda m: m["shards"][0].update(name=None), "shard entry 0 has no file name"),
    (lambda m: m["shards"][0].update(name=""), "shard entry 0 has no file name"),
    (lambda m: m["shards"][0].update(count="4"), "shard entry 0: count must be a whole number"),
    (lambda m: m["shards"][0].update(sha256=7), "shard entry 0: sha256 must be 64 hexadecimal digits"),
    (lambda m: m.update(shards={"name": "seg-000000.tar"}), "shards must be a list"),
    (lambda m: m.update(count=None), "count must be a whole number"),
    (lambda m: m.update(count=99), "count 99 is not the sum of the shards' counts (4)"),
    (lambda m: m["shards"].append(dict(m["shards"][0])), "shard entry 1 lists seg-000000.tar twice"),
])
def test_broken_manifest_entries_are_one_line(tmp_path, edit, message):
    folder = seg_folder(tmp_path)
    rewrite_manifest(folder, edit)
    for call in (read_manifest, check_folder, check_checksums):
        try:
            result = call(folder)
        except ShardFolderError as error:
            text = str(error)
        else:  # check_checksums reports problems instead of raising
            assert call is check_checksums and len(result) == 1
            text = result[0]
        assert message in text and one_line(text) and str(folder / "manifest.json") in text, call
    problems = verify(folder)
    assert len(problems) == 1 and message in problems[0]


def test_an_index_declaring_members_beyond_its_shard_is_refused_before_reading(tmp_path):
    folder = seg_folder(tmp_path)
    idx = folder / "seg-000000.idx"
    header, first, *rest = idx.read_text().splitlines()
    tokens = first.split()
    tokens[2] = str(10**12)  # the first member: 1 TB
    idx.write_text("\n".join([header, " ".join(tokens), *rest]) + "\n")
    with pytest.raises(ShardFolderError, match=f"{idx}: line 2 declares .* beyond the end of its shard") as error:
        read_samples(str(folder / "seg-000000.tar"))
    assert one_line(str(error.value))
    with pytest.raises(ShardFolderError, match="beyond the end"):
        open_shard_set(folder, "seg")
    for bad in ("png x 10 s0.png", "png -5 10 s0.png", "png 0 10 s0.jpg"):
        idx.write_text("\n".join([header, bad, *rest]) + "\n")
        with pytest.raises(ShardFolderError, match=f"{idx}: line 2") as error:
            parse_index(str(folder / "seg-000000.tar"), str(idx))
        assert one_line(str(error.value))


def test_a_member_read_beyond_the_file_fails_before_allocating(tmp_path):
    folder = seg_folder(tmp_path)
    tar = str(folder / "seg-000000.tar")
    sample = Sample("s0", tar, {"png": (512, 10**12), "mask.png": (512, 10)})
    with pytest.raises(OSError, match="declares 1000000000000 bytes at 512, beyond the end of the file"):
        sample.read("png")
    with pytest.raises(CorruptSample, match=f"{tar}: sample s0: .*beyond the end of the file"):
        decode_sample(sample, "seg")


def test_a_tar_member_declaring_a_terabyte_is_one_line(tmp_path):
    folder = seg_folder(tmp_path)
    tar = folder / "seg-000000.tar"
    data = bytearray(tar.read_bytes())
    header = tarfile.TarInfo.frombuf(bytes(data[:512]), "utf-8", "surrogateescape")
    header.size = 1 << 40
    data[:512] = header.tobuf(tarfile.GNU_FORMAT)  # base-256 size, as GNU tar writes huge members
    tar.write_bytes(bytes(data))
    (folder / "seg-000000.idx").unlink()  # the reader scans the tar itself
    with pytest.raises(ShardFolderError, match=f"{tar}: cannot read shard") as error:
        read_samples(str(tar))
    assert one_line(str(error.value))
    problems = verify(folder)
    assert problems and all(one_line(p) for p in problems)


def test_absolute_keys_and_keys_with_spaces_fail_verify_and_the_index(tmp_path):
    folder = seg_folder(tmp_path, n=2)
    good = members_of(folder)
    write_shard(folder, "seg-000000.tar", {"/abs/k": good["s0"], "a b": good["s1"]})
    problems = verify(folder)
    assert any("key '/abs/k' is not a relative path of letters, digits, _, - and /" in p for p in problems)
    assert any("key 'a b' is not a relative path" in p for p in problems)
    with pytest.raises(ShardFolderError, match="seg-000000.idx: line 2 names member /abs/k\\.") as error:
        open_shard_set(folder, "seg")
    assert one_line(str(error.value))
    idx = folder / "seg-000000.idx"
    header, *lines = idx.read_text().splitlines()
    idx.write_text("\n".join([header, lines[1]]) + "\n")  # the spaced key alone
    with pytest.raises(ShardFolderError, match=f"{idx}: line 2 is malformed") as error:
        read_samples(str(folder / "seg-000000.tar"))
    assert one_line(str(error.value))


def test_check_checksums_finds_a_tampered_shard(tmp_path):
    folder = seg_folder(tmp_path, n=4, maxcount=2)
    assert check_checksums(folder) == []
    tar = Path(shard_paths(folder)[1])
    data = bytearray(tar.read_bytes())
    data[700] ^= 0x01  # one bit inside a member: the tar still reads
    tar.write_bytes(bytes(data))
    assert check_checksums(folder) == [f"{tar}: sha256 differs from the manifest (file changed or damaged)"]
    tar.unlink()
    assert check_checksums(folder) == [f"{tar}: missing"]
    assert check_checksums(tmp_path) == [f"{tmp_path / 'manifest.json'}: no manifest (not a shard folder, or a "
                                         "conversion that never started)"]


# -- item 3: members that do not decode ----------------------------------------------------------------------

def test_zero_byte_and_undecodable_images_are_corrupt_samples(tmp_path):
    assert decode_image(b"") is None and decode_image(b"\x89PNG\r\n\x1a\n") is None
    folder = seg_folder(tmp_path, n=6)
    good = members_of(folder)
    good["s2"]["png"] = b""
    write_shard(folder, "seg-000000.tar", good)
    shard = folder / "seg-000000.tar"
    sample = next(s for s in open_shard_set(folder, "seg").samples if s.key == "s2")
    with pytest.raises(CorruptSample, match=f"^{shard}: sample s2: member png: empty \\(0 bytes\\)$"):
        decode_sample(sample, "seg")
    batches = build_loader("pretrain", seg=str(folder), batch_size=3, crop_sizes=(32, 32), backend="torch",
                           num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):  # two epochs: the empty sample is met twice, warned once
            assert next(batches)["image"].shape == (3, 3, 32, 32)
    named = [str(w.message) for w in caught if "s2" in str(w.message)]
    assert len(named) == 1 and str(shard) in named[0] and "skipping corrupt sample" in named[0]


def test_the_evaluator_names_an_empty_image_in_one_line(tmp_path):
    from wsshm.evaluate import EvalDataError, load_eval_set

    for i in range(2):
        _save(tmp_path / "img" / f"e{i}.png", np.random.default_rng(i).integers(0, 256, (12, 16, 3), dtype=np.uint8))
        _save(tmp_path / "alpha" / f"e{i}.png", _mask(seed=i))
    convert("eval", pair_folders(tmp_path / "img", {"alpha": tmp_path / "alpha"}), tmp_path / "eval", progress=False)
    stored = members_of(tmp_path / "eval")
    stored["e1"]["png"] = b""
    write_shard(tmp_path / "eval", "eval-000000.tar", stored)
    with pytest.raises(EvalDataError, match=r"eval-000000.tar: sample e1: member png: empty \(0 bytes\)$"):
        load_eval_set(tmp_path / "eval")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB and holds no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height", [(10_000, 9_000), (30_000, 30_000)])  # over ours; over Pillow's too
def test_images_over_the_cap_are_refused_from_their_header(tmp_path, width, height):
    data = _png_header(width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not leak out
        assert decode_image(data) is None
        sample = Sample("k", str(tmp_path / "x.tar"), {"png": (0, len(data)), "mask.png": (0, len(data))})
        (tmp_path / "x.tar").write_bytes(data)
        with pytest.raises(CorruptSample, match=f"member png: decompression bomb: .*over the limit of "
                                                f"{MAX_IMAGE_PIXELS} pixels"):
            decode_sample(sample, "seg")
        with pytest.raises(BadInput, match="decompression bomb"):
            load_grey(str(tmp_path / "x.tar"), "mask", binary=True)


def test_importing_the_shards_leaves_pils_limit_alone():
    import wsshm.shards  # noqa: F401
    import wsshm.shards.cli  # noqa: F401
    import wsshm.shards.images  # noqa: F401

    assert Image.MAX_IMAGE_PIXELS == PIL_DEFAULT_LIMIT
    assert DEFAULT_MAX_PIXELS == MAX_IMAGE_PIXELS  # the converter keeps only what the readers decode


# -- item 5: VOC-style and empty masks -----------------------------------------------------------------------

VOC_PALETTE = [0, 0, 0] + [v for i in range(1, 256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def _palette_png(path: Path, indices: np.ndarray, palette=VOC_PALETTE) -> Path:
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _stored(member) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(member.data)))


def test_voc_style_masks_keep_their_person(tmp_path):
    person = _mask() > 0
    grey15 = _save(tmp_path / "grey15.png", np.where(person, 15, 0).astype(np.uint8))
    member = load_grey(str(grey15), "mask", binary=True)
    assert (_stored(member) == np.where(person, 255, 0)).all() and member.normalised == "mask 0/15 scaled to 0/255"
    voc = _palette_png(tmp_path / "voc.png", np.where(person, 15, 0).astype(np.uint8))
    assert (_stored(load_grey(str(voc), "mask", binary=True)) == np.where(person, 255, 0)).all()
    # a black-and-white mask saved as a palette image whose index 0 is white: read by colour, not index
    inverted = _palette_png(tmp_path / "bw.png", np.where(person, 1, 0).astype(np.uint8),
                            [255, 255, 255, 0, 0, 0] + [0] * 762)
    assert (_stored(load_grey(str(inverted), "mask", binary=True)) == np.where(person, 0, 255)).all()
    indices = np.where(person, 15, 0).astype(np.uint8)
    indices[0, :] = 255  # VOC's void border
    with pytest.raises(BadInput, match="palette mask with indices 0, 15, 255: a class map"):
        load_grey(str(_palette_png(tmp_path / "void.png", indices)), "mask", binary=True)
    classes = np.where(person, 2, 1).astype(np.uint8)
    classes[0, 0] = 0
    with pytest.raises(BadInput, match="mask values 0, 1, 2 are all below 128: a class map"):
        load_grey(str(_save(tmp_path / "classes.png", classes)), "mask", binary=True)
    soft = np.clip(np.where(person, 230, 20) + np.random.default_rng(0).integers(-9, 9, person.shape), 0, 255)
    member = load_grey(str(_save(tmp_path / "soft.png", soft.astype(np.uint8))), "mask", binary=True)
    assert (_stored(member) == np.where(person, 255, 0)).all() and member.normalised == "mask thresholded at 128"


def test_voc_masks_convert_and_class_maps_are_rejected_by_name(tmp_path, capsys):
    person = _mask() > 0
    for i in range(3):
        _save(tmp_path / "img" / f"s{i}.jpg", np.random.default_rng(i).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    _save(tmp_path / "msk" / "s0.png", np.where(person, 15, 0).astype(np.uint8))
    _palette_png(tmp_path / "msk" / "s1.png", np.where(person, 15, 0).astype(np.uint8))
    indices = np.where(person, 15, 0).astype(np.uint8)
    indices[0, :] = 255
    _palette_png(tmp_path / "msk" / "s2.png", indices)
    assert main(["seg", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"), "--out",
                 str(tmp_path / "seg"), "--no-progress", "--workers", "1"]) == 0
    stored = members_of(tmp_path / "seg")
    assert sorted(stored) == ["s0", "s1"]
    for key in ("s0", "s1"):
        assert (np.asarray(Image.open(io.BytesIO(stored[key]["mask.png"]))) == np.where(person, 255, 0)).all()
    errors = [json.loads(line) for line in (tmp_path / "seg" / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"path": str(tmp_path / "msk" / "s2.png"),
                       "reason": "palette mask with indices 0, 15, 255: a class map; wsshm cannot tell which "
                                 "class is the person (save the mask as 0/255, or 0 and one value)"}]
    assert verify(tmp_path / "seg") == []


def test_empty_masks_are_warned_about_by_the_converter_and_verify(tmp_path, capsys):
    empty = np.zeros((12, 16), np.uint8)
    root = tmp_path
    for i in range(3):
        _save(root / "img" / f"s{i}.png", np.random.default_rng(i).integers(0, 256, (12, 16, 3), dtype=np.uint8))
        _save(root / "msk" / f"s{i}.png", empty if i == 1 else _mask(seed=i))
    assert main(["seg", "--images", str(root / "img"), "--masks", str(root / "msk"), "--out", str(root / "seg"),
                 "--no-progress", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert (f"warning: {root / 'msk' / 's1.png'}: mask has no foreground (every pixel 0); the sample is kept and "
            "trains as background only") in err
    assert read_manifest(root / "seg")["count"] == 3
    notes = []
    assert verify(root / "seg", warnings_out=notes) == []
    assert notes == [f"{root / 'seg' / 'seg-000000.tar'}:s1: mask.png has no foreground (every pixel 0)"]
    with pytest.warns(RuntimeWarning, match="s1: mask.png has no foreground"):
        assert verify(root / "seg") == []  # a caller that collects nothing still sees it
    assert main(["verify", str(root / "seg")]) == 0  # sound, with a warning the user sees
    out, err = capsys.readouterr()
    assert f"{root / 'seg'}: ok, 1 warning(s)" in out
    assert "warning: " in err and "s1: mask.png has no foreground" in err


def test_max_pixels_above_the_cap_is_refused_by_the_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["seg", "--images", str(tmp_path), "--masks", str(tmp_path), "--out", str(tmp_path / "o"),
              "--max-pixels", str(MAX_IMAGE_PIXELS + 1)])
    assert exit_info.value.code == 2
    assert f"at most {MAX_IMAGE_PIXELS}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
