"""The built-in demo data, the readers (webdataset, DALI on CPU), and the real-photo kit when present."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from wsshm.shards import index_paths, read_manifest, shard_paths, verify
from wsshm.shards.demo_data import DEFAULTS, generate, natural, synthetic
from wsshm.shards.pairing import pair_folders
from wsshm.shards.writer import convert

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
FOLDERS = ("matte", "background", "seg", "eval-natural", "eval-synthetic")
SMALL = dict(size=64, mattes=4, backgrounds=4, seg=8, eval_natural=4, eval_synthetic=4)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("demo"), seed=0, **SMALL)


def decode(data):
    return np.asarray(Image.open(io.BytesIO(data)))


def test_demo_writes_the_five_verified_folders(demo):
    assert sorted(demo) == sorted(FOLDERS)
    kinds = {name: read_manifest(path)["kind"] for name, path in demo.items()}
    assert kinds == {"matte": "matte", "background": "background", "seg": "seg", "eval-natural": "eval",
                     "eval-synthetic": "eval"}
    counts = {name: read_manifest(path)["count"] for name, path in demo.items()}
    assert counts == {"matte": 4, "background": 4, "seg": 8, "eval-natural": 4, "eval-synthetic": 4}
    for path in demo.values():
        assert verify(path) == [] and len(shard_paths(path)) == 4  # several shards, for several ranks
    first = next(iter(wds.WebDataset(shard_paths(demo["eval-natural"]), shardshuffle=False)))
    assert decode(first["jpg"]).shape == (64, 48, 3) and decode(first["alpha.png"]).shape == (64, 48)


def test_demo_is_deterministic_and_seeded(demo, tmp_path):
    again = generate(tmp_path / "again", seed=0, **SMALL)
    other = generate(tmp_path / "other", seed=1, **{**SMALL, "mattes": 4})
    for name in FOLDERS:
        shas = [s["sha256"] for s in read_manifest(demo[name])["shards"]]
        assert shas == [s["sha256"] for s in read_manifest(again[name])["shards"]]
        assert shas != [s["sha256"] for s in read_manifest(other[name])["shards"]]


def test_generate_and_the_cli_take_their_defaults_from_DEFAULTS(tmp_path, monkeypatch):
    from wsshm.shards import cli, demo_data
    from wsshm.shards.pairing import Scan

    rendered = {}
    monkeypatch.setattr(demo_data, "_render", lambda src, kind, count, size, seed, *_: rendered.update(
        {kind: (count, size, seed)}))
    monkeypatch.setattr(demo_data, "pair_folders", lambda *a, **k: Scan())
    monkeypatch.setattr(demo_data, "convert", lambda *a, **k: None)
    generate(tmp_path / "data")
    d = DEFAULTS
    assert rendered == {"matte": (d["mattes"], d["size"], d["seed"]), "background": (d["backgrounds"], d["size"], d["seed"]),
                        "seg": (d["seg"], d["size"], d["seed"]), "eval-natural": (d["eval_natural"], d["size"], d["seed"]),
                        "eval-synthetic": (d["eval_synthetic"], d["size"], d["seed"])}
    called = {}
    monkeypatch.setattr(cli, "generate", lambda out, **kw: called.update(kw) or {})
    assert cli.main(["demo", "--out", str(tmp_path / "cli")]) == 0
    assert {k: called[k] for k in DEFAULTS} == DEFAULTS


def test_alphas_have_soft_boundaries_and_hair_strands(demo):
    for name in ("matte", "eval-natural", "eval-synthetic"):
        for sample in wds.WebDataset(shard_paths(demo[name]), shardshuffle=False):
            alpha = decode(sample["alpha.png"]).astype(np.float32) / 255
            boundary = (alpha > 0.05) & (alpha < 0.95)
            assert boundary.sum() > 0.08 * (alpha > 0.5).sum(), name  # a real soft band, not a hard cut
            assert ((alpha > 0.05) & (alpha < 0.5)).sum() > 30, name  # thin, see-through strands


def test_natural_domain_is_consistent_and_masks_are_coarse():
    rng = np.random.default_rng(5)
    soft_natural, soft_synthetic = [], []
    for _ in range(4):
        data, alpha, mask = natural(rng, 128, 96)
        assert data[:2] == b"\xff\xd8"  # a camera's JPEG
        person = alpha > 0.5
        iou = (person & (mask > 0)).sum() / (person | (mask > 0)).sum()
        assert iou > 0.85 and set(np.unique(mask)) <= {0, 255}
        assert alpha[mask == 0].sum() > 5  # annotators leave the strands out
        soft_natural.append(((alpha > 0.05) & (alpha < 0.95)).sum() / person.sum())
        png, alpha_s = synthetic(rng, 128, 96)
        assert png[:4] == b"\x89PNG"
        soft_synthetic.append(((alpha_s > 0.05) & (alpha_s < 0.95)).sum() / (alpha_s > 0.5).sum())
    assert np.mean(soft_natural) > np.mean(soft_synthetic)  # the lens blurs subject and alpha together


def test_dali_reads_the_shards_through_their_indexes_on_cpu(demo):
    from nvidia.dali import fn, pipeline_def, types

    folder = demo["seg"]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        image, mask, meta = fn.readers.webdataset(paths=shard_paths(folder), index_paths=index_paths(folder),
                                                  ext=["jpg;png", "mask.png", "json"], missing_component_behavior="error")
        return (fn.decoders.image(image, device="cpu", output_type=types.RGB),
                fn.decoders.image(mask, device="cpu", output_type=types.GRAY), meta)

    p = pipe()
    p.build()
    assert list(p.epoch_size().values()) == [8]
    seen = []
    for _ in range(2):
        images, masks, metas = p.run()
        for i in range(4):
            meta = json.loads(bytes(np.array(metas[i])).decode())
            assert np.array(images[i]).shape == (meta["height"], meta["width"], 3)
            assert set(np.unique(np.array(masks[i]))) <= {0, 255}
            seen.append(meta["source"])
    assert sorted(seen) == sorted(json.loads(s["json"])["source"]
                                  for s in wds.WebDataset(shard_paths(folder), shardshuffle=False))


@pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is absent")
def test_real_photo_folders_convert_with_the_expected_counts(tmp_path):
    jobs = {
        "seg": (pair_folders(REALDATA / "ccp" / "images", {"mask": REALDATA / "ccp" / "masks"}), 1003),
        "rbg": (pair_folders(REALDATA / "rbg" / "images", {"mask": REALDATA / "rbg" / "masks"}), 290),
        "matte": (pair_folders(REALDATA / "p3m-demo" / "images", {"alpha": REALDATA / "p3m-demo" / "alphas"}), 15),
        "background": (pair_folders(REALDATA / "backgrounds", {}), 80),
    }
    for name, (scan, expected) in jobs.items():
        kind = "seg" if name == "rbg" else name
        summary = convert(kind, scan, tmp_path / name, workers=2, progress=False)
        assert (summary["count"], summary["errors"]) == (expected, 0), name
        assert read_manifest(tmp_path / name)["count"] == expected
    for name in ("matte", "background"):
        assert verify(tmp_path / name) == []
