"""Several seg folders in one loader: the asked-for proportions, folder choice shared by both backends,
disjoint ranks, exact resume, and clear errors for weights that do not fit."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from wsshm.data import build_loader
from wsshm.data.mixing import interleave
from wsshm.shards.pairing import pair_folders
from wsshm.shards.writer import convert

BACKENDS = ["torch", "dali"]
SIZES = {"a": 12, "b": 7}  # sample ids 0..11 in folder a, 12..18 in folder b


def colour_of(index: int) -> tuple:
    return (index * 13 % 256, 40 + index, 200 - index)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two seg folders of flat-coloured images of odd sizes: a crop's colour names its sample."""
    root = tmp_path_factory.mktemp("mix")
    out, first = {}, 0
    for name, count in SIZES.items():
        images, masks = root / name / "images", root / name / "masks"
        images.mkdir(parents=True)
        masks.mkdir()
        for i in range(first, first + count):
            h, w = 50 + 2 * i, 80 - i
            Image.fromarray(np.full((h, w, 3), colour_of(i), np.uint8)).save(images / f"s{i:02d}.png")
            mask = np.zeros((h, w), np.uint8)
            mask[h // 2:] = 255
            Image.fromarray(mask).save(masks / f"s{i:02d}.png")
        convert("seg", pair_folders(images, {"mask": masks}), root / name / "seg", maxcount=4, progress=False)
        out[name] = str(root / name / "seg")
        first += count
    return out


def sample_ids(raw) -> list[int]:
    ids = []
    for crop in raw["image"].cpu().numpy():
        colour = tuple(int(v) for v in crop[crop.shape[0] // 2, crop.shape[1] // 2])
        ids.append(next(i for i in range(sum(SIZES.values())) if colour_of(i) == colour))
    return ids


def folder_of(ids) -> list[int]:
    return [int(i >= SIZES["a"]) for i in ids]


def mixed(backend, folders, weights=(1.0, 0.5), form="pretrain", **kw):
    kw.setdefault("num_workers", 0 if backend == "torch" else 1)
    return build_loader(form, seg=[folders["a"], folders["b"]], seg_weights=weights,
                        batch_size=kw.pop("batch_size", 3), crop_sizes=64, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_global_batch_holds_the_asked_for_shares_and_ranks_stay_disjoint(backend, folders):
    ranks = [mixed(backend, folders, rank=r, world_size=2) for r in (0, 1)]  # global batch 6: 4 of a, 2 of b
    seen_a = []
    for step in range(8):
        per_rank = [sample_ids(loader.next_raw()) for loader in ranks]
        assert not set(per_rank[0]) & set(per_rank[1])
        both = per_rank[0] + per_rank[1]
        assert folder_of(both).count(0) == 4 and folder_of(both).count(1) == 2
        for rank, ids in enumerate(per_rank):  # the folder of each sample: the same in both backends
            positions = np.arange(step * 6 + rank * 3, step * 6 + rank * 3 + 3)
            assert folder_of(ids) == interleave((1.0, 0.5), positions, 0)[0].tolist()
        seen_a += [i for i in both if i < SIZES["a"]]
    if backend == "torch":  # folder a's stream: all 12 samples before any repeats
        assert sorted(seen_a[:12]) == list(range(12))


@pytest.mark.parametrize("weights", [(3.0, 1.0, 0.5), (1.0, 0.5), (12.0, 7.0), (1.0, 1.0, 1.0, 1.0)])
def test_shares_over_many_batches_and_each_folders_stream_walked_in_order(weights):
    folder, within = interleave(weights, np.arange(10 * 4000), seed=11)
    shares = np.array(weights) / sum(weights)
    per_batch = np.stack([np.bincount(b, minlength=len(weights)) for b in folder.reshape(4000, 10)])
    # the first folder: floor or ceil of its share in every global batch of 10; the others within 2
    assert np.all(np.abs(per_batch[:, 0] - 10 * shares[0]) < 1)
    assert np.all(np.abs(per_batch - 10 * shares) < 2)
    np.testing.assert_allclose(per_batch.sum(0) / folder.size, shares, atol=1e-3)
    for i in range(len(weights)):  # each folder's positions take its stream 0, 1, 2, ... in order
        assert np.array_equal(within[folder == i], np.arange(np.count_nonzero(folder == i)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_gives_the_same_next_batches(backend, folders):
    first = mixed(backend, folders, form="student", seed=4)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    expected = [first.next_raw() for _ in range(3)]
    resumed = mixed(backend, folders, form="student", seed=4)
    resumed.load_state_dict(state)
    got = [resumed.next_raw() for _ in range(3)]
    for a, b in zip(expected, got):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert 1 in folder_of(sum((sample_ids(raw) for raw in got), []))
    other = mixed(backend, folders, weights=(1.0, 1.0), form="student", seed=4)
    with pytest.raises(ValueError, match="folders"):
        other.load_state_dict(state)


def test_default_weights_are_the_folder_sizes(folders):
    loader = build_loader("pretrain", seg=[folders["a"], folders["b"]], batch_size=19, crop_sizes=64,
                          num_workers=0)
    assert loader.state_dict()["folders"] == [[12, 12.0], [7, 7.0]]
    ids = sample_ids(loader.next_raw())  # 12 of a, 7 of b: each folder's whole epoch
    assert sorted(ids) == list(range(19))


def test_one_folder_in_a_list_reads_as_that_folder(folders):
    alone = build_loader("pretrain", seg=folders["a"], batch_size=3, crop_sizes=64, num_workers=0)
    listed = build_loader("pretrain", seg=[folders["a"]], seg_weights=[2], batch_size=3, crop_sizes=64,
                          num_workers=0)
    for _ in range(5):
        assert sample_ids(alone.next_raw()) == sample_ids(listed.next_raw())


def test_num_samples_subsets_only_the_first_folder(folders):
    loader = mixed("torch", folders, num_samples=4, batch_size=6)
    assert loader.state_dict()["folders"] == [[4, 1.0], [7, 0.5]]
    ids = sum((sample_ids(loader.next_raw()) for _ in range(6)), [])
    assert len({i for i in ids if i < SIZES["a"]}) == 4 and len({i for i in ids if i >= SIZES["a"]}) == 7


@pytest.mark.parametrize("weights, message", [((1.0,), "1 mixing weights for 2 folders"),
                                              ((1.0, 0.0), "must be positive"),
                                              ((1.0, float("nan")), "must be positive")])
def test_weights_that_do_not_fit_are_one_line_errors(folders, weights, message):
    with pytest.raises(ValueError, match=message):
        mixed("torch", folders, weights=weights)


def test_weights_for_a_form_without_seg_folders_are_refused(folders):
    with pytest.raises(ValueError, match="reads no seg folder"):
        build_loader("teacher", matte=folders["a"], background=folders["b"], seg_weights=[1], batch_size=2)
