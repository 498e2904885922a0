"""Both loaders (PyTorch and DALI) on tiny shard folders: batch contents, sharding, resume, bad data."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsshm.data import DataError, build_loader, params
from wsshm.data.prepare import fused_prepare_reference
from wsshm.image import denormalize, normalize_uint8
from wsshm.shards import read_manifest, select_subset
from wsshm.shards.pairing import pair_folders
from wsshm.shards.writer import convert, sha256_file, write_index

BACKENDS = ["torch", "dali"]
CROPS = (64, 96)
REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from wsshm.shards.demo_data import generate

    return generate(tmp_path_factory.mktemp("demo"), size=96, mattes=8, backgrounds=8, seg=16, eval_natural=1,
                    eval_synthetic=1)


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def colour_of(index: int) -> tuple:
    return (index * 13 % 256, 40 + index, 200 - index)


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """A seg folder of 12 flat-coloured images of odd sizes: a crop's colour names its sample."""
    root = tmp_path_factory.mktemp("coded")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(12):
        h, w = 50 + 3 * i, 71 - 2 * i
        Image.fromarray(np.full((h, w, 3), colour_of(i), np.uint8)).save(root / "images" / f"s{i:02d}.png")
        mask = np.zeros((h, w), np.uint8)
        mask[h // 3 :, : w // 2] = 255
        Image.fromarray(mask).save(root / "masks" / f"s{i:02d}.png")
    convert("seg", pair_folders(root / "images", {"mask": root / "masks"}), root / "seg", maxcount=5, progress=False)
    return str(root / "seg")


def sample_ids(raw) -> list[int]:
    """Which coded samples a uint8 batch (``next_raw()``) holds, read back from the colour of each crop."""
    ids = []
    for crop in raw["image"].cpu().numpy():
        colour = tuple(int(v) for v in crop[crop.shape[0] // 2, crop.shape[1] // 2])
        ids.append(next(i for i in range(12) if colour_of(i) == colour))
    return ids


def loader(backend, form, folders, **kw):
    kw.setdefault("num_workers", 0 if backend == "torch" else 1)
    return build_loader(form, seg=folders.get("seg"), matte=folders.get("matte"),
                        background=folders.get("background"), batch_size=kw.pop("batch_size", 3),
                        crop_sizes=kw.pop("crop_sizes", CROPS), backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_have_the_contract_keys_shapes_and_ranges(backend, demo):
    expected = {"pretrain": {"image": 3, "mask": 1}, "teacher": {"image": 3, "alpha": 1},
                "student": {"weak": 3, "strong": 3, "mask": 1}}
    for form, keys in expected.items():
        batches = loader(backend, form, demo)
        sizes = set()
        for _ in range(4):
            batch = next(batches)
            assert set(batch) == set(keys)
            size = batch[next(iter(keys))].shape[-1]
            sizes.add(size)
            for key, channels in keys.items():
                assert batch[key].shape == (3, channels, size, size) and batch[key].dtype == torch.float32
                if channels == 1:
                    assert 0.0 <= batch[key].min() and batch[key].max() <= 1.0
                else:  # normalised ImageNet range: pixel values in [0, 1] before normalisation
                    assert torch.all((denormalize(batch[key]) - 0.5).abs() <= 0.5 + 1e-6)
                    assert batch[key].std() > 0.1
            if form != "teacher":
                assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
        assert sizes <= set(CROPS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_image_is_eq1_composite_of_the_sampled_crops(backend, demo):
    batches = loader(backend, "teacher", demo)
    raw = batches.next_raw()  # the uint8 crops the batch is made from
    batch = batches.finish(raw)
    fg = raw["fg"].permute(0, 3, 1, 2).double()
    bg = raw["background"].permute(0, 3, 1, 2).double()
    alpha = batch["alpha"].double()
    assert torch.equal(batch["alpha"][:, 0], raw["alpha"].float() / 255)
    assert 0 < alpha.mean() < 1  # both foreground and background show
    expected = (alpha * fg + (1 - alpha) * bg) / 255
    torch.testing.assert_close(denormalize(batch["image"]).double(), expected, atol=2e-6, rtol=0)
    assert not torch.equal(raw["fg"], raw["background"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_views_share_geometry_and_differ_in_colour(backend, demo):
    batches = loader(backend, "student", demo, seed=3)
    next(batches)
    raw = batches.next_raw()  # step 1
    batch = batches.finish(raw)
    torch.testing.assert_close(batch["weak"], normalize_uint8(raw["image"]), atol=1e-5, rtol=0)
    jitter = torch.from_numpy(params.jitter(params.AugmentConfig(crop_sizes=CROPS), 3, 3, 1, 0))
    assert torch.equal(raw["jitter"], jitter)
    _, strong = fused_prepare_reference(raw["image"], jitter=jitter, plain=False)
    torch.testing.assert_close(batch["strong"], strong, atol=1e-4, rtol=0)
    assert (batch["strong"] - batch["weak"]).abs().mean() > 0.02
    # same geometry: the image's edges sit at the same places in both views
    edges = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean(1)  # noqa: E731
    weak_edges, strong_edges = edges(batch["weak"]).flatten(1), edges(batch["strong"]).flatten(1)
    correlation = torch.nn.functional.cosine_similarity(weak_edges, strong_edges)
    assert correlation.min() > 0.6


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_read_disjoint_samples_with_equal_full_batches(backend, coded):
    per_rank = []
    for rank in (0, 1):
        batches = loader(backend, "pretrain", {"seg": coded}, batch_size=3, rank=rank, world_size=2)
        ids = []
        for _ in range(2):  # 2 steps x 2 ranks x 3 = the 12 samples of one epoch
            raw = batches.next_raw()
            assert batches.finish(raw)["image"].shape[0] == 3
            ids += sample_ids(raw)
        per_rank.append(ids)
    assert not set(per_rank[0]) & set(per_rank[1])
    if backend == "torch":  # one shuffled epoch over both ranks
        assert sorted(per_rank[0] + per_rank[1]) == list(range(12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_saved_state_gives_the_same_next_batches(backend, demo):
    for form in ("teacher", "student"):
        first = loader(backend, form, demo, seed=5)
        fresh_start = next(loader(backend, form, demo, seed=5))
        for _ in range(3):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        expected = [next(first) for _ in range(2)]
        resumed = loader(backend, form, demo, seed=5)
        resumed.load_state_dict(state)
        got = [next(resumed) for _ in range(2)]
        for a, b in zip(expected, got):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        key = next(iter(fresh_start))
        assert fresh_start[key].shape != got[0][key].shape or not torch.equal(fresh_start[key], got[0][key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_samples_reads_the_deterministic_subset(backend, coded):
    keys = [f"s{i:02d}" for i in range(12)]
    chosen = {int(k[1:]) for k in select_subset(keys, 4, 7)}
    batches = loader(backend, "pretrain", {"seg": coded}, batch_size=2, num_samples=4, seed=7)
    seen = set()
    for _ in range(6):
        seen.update(sample_ids(batches.next_raw()))
    assert seen == chosen


def test_torch_loader_workers_give_the_same_batches_as_the_main_process(demo):
    inline = loader("torch", "student", demo, num_workers=0)
    workers = loader("torch", "student", demo, num_workers=2)
    for _ in range(3):
        a, b = next(inline), next(workers)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_option(demo):
    batch = next(loader("torch", "student", demo, dtype=torch.bfloat16))
    assert batch["weak"].dtype == torch.bfloat16 and batch["strong"].dtype == torch.bfloat16
    assert batch["mask"].dtype == torch.float32


@pytest.fixture()
def corrupt_seg(coded, tmp_path):
    """A copy of the coded folder whose first shard holds a jpg that does not decode (another tool wrote it)."""
    import shutil

    import webdataset as wds

    folder = tmp_path / "seg"
    shutil.copytree(coded, folder)
    manifest = read_manifest(folder)
    tar = folder / manifest["shards"][0]["name"]
    samples = list(wds.WebDataset(str(tar), shardshuffle=False))
    bad_key = samples[1]["__key__"]
    with wds.TarWriter(str(tar)) as sink:
        for s in samples:
            members = {k: v for k, v in s.items() if not k.startswith("__")}
            if s["__key__"] == bad_key:
                members = {"jpg": b"\xff\xd8 not really a jpeg", "mask.png": members["mask.png"], "json": members["json"]}
            sink.write({"__key__": s["__key__"], **members})
    write_index(tar, folder / (tar.stem + ".idx"))
    manifest["shards"][0]["sha256"] = sha256_file(tar)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, tar, bad_key


def test_torch_loader_skips_a_corrupt_sample_with_a_warning(corrupt_seg):
    folder, tar, bad_key = corrupt_seg
    batches = loader("torch", "pretrain", {"seg": folder}, batch_size=4)
    with pytest.warns(RuntimeWarning, match=rf"{tar}.*{bad_key}"):
        for _ in range(3):  # one full epoch: the bad sample is met
            batch = next(batches)
            assert batch["image"].shape[0] == 4
            assert torch.isfinite(batch["image"]).all()


def test_dali_loader_refuses_corrupt_shards_up_front(corrupt_seg):
    folder, tar, bad_key = corrupt_seg
    with pytest.raises(DataError, match=rf"verification.*{bad_key}") as error:
        loader("dali", "pretrain", {"seg": folder})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_or_empty_folders_are_clear_errors(backend, tmp_path, demo):
    with pytest.raises(DataError, match="not found"):
        loader(backend, "pretrain", {"seg": tmp_path / "nowhere"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest"):
        loader(backend, "pretrain", {"seg": tmp_path / "empty"})
    with pytest.raises(DataError, match="holds 'matte' shards where 'seg' shards are needed"):
        loader(backend, "student", {"seg": demo["matte"]})
    with pytest.raises(DataError, match="no background shard folder"):
        loader(backend, "teacher", {"matte": demo["matte"]})


def test_bad_options_are_rejected(demo):
    with pytest.raises(ValueError, match="unknown loader form"):
        build_loader("finetune", seg=demo["seg"], batch_size=2)
    with pytest.raises(ValueError, match="multiples of 32"):
        build_loader("pretrain", seg=demo["seg"], batch_size=2, crop_sizes=(50, 90))
    with pytest.raises(ValueError, match="rank"):
        build_loader("pretrain", seg=demo["seg"], batch_size=2, rank=2, world_size=2)


def test_crop_size_is_one_per_batch_and_shared_by_ranks():
    config = params.AugmentConfig(crop_sizes=(512, 768))
    assert config.crop_sizes == (512, 544, 576, 608, 640, 672, 704, 736, 768)
    drawn = {params.crop_size(config, 0, step) for step in range(200)}
    assert drawn == set(config.crop_sizes)
    geo0, geo1 = params.geometry(config, 4, 0, 3, 0), params.geometry(config, 4, 0, 3, 1)
    assert not np.array_equal(geo0.x, geo1.x)
    assert np.all((geo0.scale >= 1.0) & (geo0.scale <= 1.5))


@pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is absent")
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_photos_feed_teacher_and_student(backend, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "real"
    if not (root / "seg" / "manifest.json").exists():
        kw = {"limit": 6, "progress": False}
        convert("seg", pair_folders(REALDATA / "ccp" / "images", {"mask": REALDATA / "ccp" / "masks"}), root / "seg", **kw)
        convert("matte", pair_folders(REALDATA / "p3m-demo" / "images", {"alpha": REALDATA / "p3m-demo" / "alphas"}),
                root / "matte", **kw)
        convert("background", pair_folders(REALDATA / "backgrounds", {}), root / "background", **kw)
    folders = {k: str(root / k) for k in ("seg", "matte", "background")}
    teacher = next(loader(backend, "teacher", folders, batch_size=2, crop_sizes=96))
    student = next(loader(backend, "student", folders, batch_size=2, crop_sizes=96))
    assert teacher["image"].shape == (2, 3, 96, 96) and teacher["alpha"].shape == (2, 1, 96, 96)
    assert 0 < teacher["alpha"].mean() < 1
    assert student["weak"].shape == student["strong"].shape == (2, 3, 96, 96)
    assert 0 < student["mask"].mean() < 1


def test_shards_without_index_files_are_scanned_and_give_the_same_batches(coded, tmp_path):
    import shutil

    folder = tmp_path / "seg"
    shutil.copytree(coded, folder)
    for idx in folder.glob("*.idx"):
        idx.unlink()
    with_index = loader("torch", "student", {"seg": coded})
    scanned = loader("torch", "student", {"seg": folder})
    for _ in range(2):
        a, b = next(with_index), next(scanned)
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(DataError, match=r"verification[\s\S]*seg-000000.idx: DALI index missing"):
        loader("dali", "student", {"seg": folder})  # DALI checks the folder as wsshm-shard verify does


@pytest.fixture(scope="module")
def one_picture(tmp_path_factory):
    """A seg folder of 4 copies of one smooth 120x90 picture: both loaders crop the same image."""
    root = tmp_path_factory.mktemp("one")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    y, x = np.mgrid[0:90, 0:120].astype(np.float32)
    image = np.stack([x * 2, y * 2.5, 128 + 100 * np.sin(x / 7) * np.cos(y / 9)], -1).astype(np.uint8)
    mask = (((x - 40) ** 2 + (y - 50) ** 2 < 900) * 255).astype(np.uint8)
    for i in range(4):
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    convert("seg", pair_folders(root / "images", {"mask": root / "masks"}), root / "seg", progress=False)
    return str(root / "seg")


def test_dali_crops_match_the_torch_loaders_for_the_same_geometry(one_picture):
    # crops of 64 (windows of 60..90 pixels: shrunk or enlarged) and 96 (enlarged), some flipped
    torch_batches, dali_batches = (loader(backend, "pretrain", {"seg": one_picture}, batch_size=4, seed=2)
                                   for backend in BACKENDS)
    for _ in range(6):
        a, b = torch_batches.next_raw(), dali_batches.next_raw()
        assert (a["image"].int() - b["image"].int()).abs().max() <= 2
        assert (a["mask"] != b["mask"]).float().mean() < 0.03
