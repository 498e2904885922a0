"""``wsshm-pseudo-label``: the folder it writes is a sound seg shard folder the loaders read, its masks
are the thresholded predictions, the confidence filter drops and reports, a bad photo is named in
errors.jsonl, bad options give one line and exit 2."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from wsshm import pseudo_label
from wsshm.inference import predict_mattes
from wsshm.models import build_model, load_weights, save_weights
from wsshm.shards import check_folder, decode_sample, read_samples, shard_paths, verify

SHORT = 64  # --short-side: small photos, fast runs
SIZES = [(64, 48), (64, 48), (48, 64), (64, 48), (48, 64)]  # two test-time sizes: batches of each


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A tiny model (its matte logits scaled so that mattes spread over [0, 1] and scores differ from
    photo to photo), saved as weights, and a folder of 5 small photos plus a zero-byte one."""
    root = tmp_path_factory.mktemp("pseudo")
    torch.manual_seed(0)
    model = build_model("unet_r18_w0.25").eval()
    with torch.no_grad():
        model.matte_head.logit.weight.mul_(200.0)
        model.matte_head.logit.bias.zero_()
    weights = root / "round0.safetensors"
    save_weights(model, weights)
    images = root / "photos"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        yy, xx = np.mgrid[:h, :w]
        photo = np.empty((h, w, 3), np.uint8)
        photo[...] = rng.integers(0, 256, 3)
        radius = 8 + 4 * i
        photo[(yy - h // 2) ** 2 + (xx - w // 2) ** 2 < radius ** 2] = rng.integers(0, 256, 3)
        photo = np.clip(photo.astype(int) + rng.integers(-20 * i, 20 * i + 1, photo.shape), 0, 255).astype(np.uint8)
        name = images / ("sub" if i == 4 else "") / f"photo{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(photo).save(name, quality=95)
    (images / "broken.jpg").write_bytes(b"")
    return {"root": root, "weights": weights, "images": images}


def run(pool, out, *extra):
    return pseudo_label.main(["--weights", str(pool["weights"]), "--images", str(pool["images"]), "--out", str(out),
                              "--short-side", str(SHORT), "--batch-size", "2", "--workers", "1", "--no-progress",
                              *extra])


@pytest.fixture(scope="module")
def labelled(pool):
    out = pool["root"] / "pseudo"
    assert run(pool, out) == 0
    return out


def samples(out):
    return {s.key: s for shard in shard_paths(out) for s in read_samples(shard)}


def test_folder_round_trips_through_the_loaders(labelled):
    from wsshm.data import build_loader

    manifest = check_folder(labelled, "seg", None)
    assert manifest["count"] == 5 and manifest["complete"] is True
    assert verify(labelled) == []
    settings = manifest["source"]["pseudo_label"]
    assert settings["weights"] == "round0.safetensors" and len(settings["weights_sha256"]) == 64
    assert settings["threshold"] == 0.5 and settings["tta"] == "none" and settings["min_confidence"] is None
    assert not (labelled / pseudo_label.MASKS).exists()  # the private masks folder is gone
    assert sorted(p.name for p in labelled.iterdir()) == ["errors.jsonl", "manifest.json", "pseudo.json",
                                                          "seg-000000.idx", "seg-000000.tar"]
    loader = build_loader("pretrain", seg=str(labelled), batch_size=2, crop_sizes=(32,), rank=0, world_size=1,
                          device="cpu", backend="torch", seed=0, num_workers=0)
    batch = next(iter(loader))
    assert any(torch.is_tensor(v) and v.shape[0] == 2 for v in batch.values())


def test_masks_are_the_thresholded_predictions(pool, labelled):
    model = load_weights(pool["weights"])
    pseudo = json.loads((labelled / "pseudo.json").read_text())
    found = samples(labelled)
    assert sorted(found) == sorted(pseudo["samples"]) == ["photo0", "photo1", "photo2", "photo3", "sub/photo4"]
    decoded = {key: decode_sample(sample, "seg") for key, sample in found.items()}
    mattes = predict_mattes(model, [image for image, _ in decoded.values()], short_side=SHORT)
    for (key, (image, mask)), matte in zip(decoded.items(), mattes):
        np.testing.assert_array_equal(mask, np.where(matte >= 0.5, 255, 0).astype(np.uint8))
        scores = pseudo["samples"][key]
        far = np.mean((matte < 0.25) | (matte > 0.75))
        assert scores["confidence"] == scores["certainty"] == pytest.approx(far, abs=1e-5)
        meta = json.loads(found[key].read("json"))
        assert meta["source"].endswith((".jpg", ".png"))
        assert meta["pseudo_label"] == scores  # each sample carries its own scores


def test_bad_image_is_named_and_the_run_succeeds(pool, labelled):
    errors = [json.loads(line) for line in (labelled / "errors.jsonl").read_text().splitlines()]
    assert [os.path.basename(e["path"]) for e in errors] == ["broken.jpg"]
    assert "cannot read image" in errors[0]["reason"] or "empty" in errors[0]["reason"]
    pseudo = json.loads((labelled / "pseudo.json").read_text())
    assert pseudo["counts"] == {"images": 6, "kept": 5, "dropped": 0, "unreadable": 1, "rejected": 1}
    # a rerun of the same command finds the folder complete and changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in labelled.iterdir()}
    assert run(pool, labelled) == 0
    assert {p.name: p.stat().st_mtime_ns for p in labelled.iterdir()} == before


def test_confidence_filter_drops_and_reports(pool, labelled, tmp_path, capsys):
    scores = {k: v["confidence"] for k, v in json.loads((labelled / "pseudo.json").read_text())["samples"].items()}
    ordered = sorted(scores.values())
    assert ordered[0] < ordered[-1], "the test model must give different scores"
    cut = (ordered[1] + ordered[2]) / 2  # two under it, three over it
    out = tmp_path / "filtered"
    capsys.readouterr()
    assert run(pool, out, "--min-confidence", f"{cut:.6f}") == 0
    err = capsys.readouterr().err
    below = sorted(k for k, v in scores.items() if v < cut)
    assert len(below) == 2
    for key in below:
        assert f"dropped {key}:" in err
    pseudo = json.loads((out / "pseudo.json").read_text())
    assert sorted(pseudo["dropped"]) == below
    assert all(pseudo["dropped"][k]["confidence"] == pytest.approx(scores[k]) for k in below)
    assert sorted(pseudo["samples"]) == sorted(set(scores) - set(below))
    assert pseudo["counts"]["kept"] == 3 and pseudo["counts"]["dropped"] == 2
    assert sorted(samples(out)) == sorted(set(scores) - set(below))
    manifest = check_folder(out, "seg", None)
    assert manifest["source"]["pseudo_label"]["min_confidence"] == pytest.approx(cut, abs=1e-6)
    assert verify(out) == []
    # another filter into the same folder is another conversion: refused without --overwrite
    assert run(pool, out, "--min-confidence", "0") == 2
    assert "different conversion" in capsys.readouterr().err


def test_flip_tta_scores_agreement(pool, tmp_path):
    out = tmp_path / "tta"
    assert run(pool, out, "--tta", "flip", "--threshold", "0.4") == 0
    pseudo = json.loads((out / "pseudo.json").read_text())
    model = load_weights(pool["weights"])
    decoded = {key: decode_sample(sample, "seg") for key, sample in samples(out).items()}
    images = [image for image, _ in decoded.values()]
    mattes = predict_mattes(model, images + [np.ascontiguousarray(image[:, ::-1]) for image in images],
                            short_side=SHORT)
    for n, (key, (image, mask)) in enumerate(decoded.items()):
        plain, back = mattes[n], mattes[len(images) + n][:, ::-1]
        np.testing.assert_array_equal(mask > 0, (plain + back) / 2 >= 0.4)
        a, b = plain >= 0.4, back >= 0.4
        iou = (a & b).sum() / max((a | b).sum(), 1) if (a | b).any() else 1.0
        scores = pseudo["samples"][key]
        assert scores["agreement"] == pytest.approx(iou, abs=1e-5)
        assert scores["confidence"] == pytest.approx(min(scores["agreement"], scores["certainty"]))
    assert check_folder(out, "seg", None)["source"]["pseudo_label"]["tta"] == "flip"


@pytest.mark.parametrize("bad, says", [
    (["--threshold", "1.5"], "--threshold"),
    (["--threshold", "0"], "--threshold"),
    (["--min-confidence", "-0.1"], "--min-confidence"),
    (["--min-confidence", "2"], "--min-confidence"),
    (["--weights", "MISSING.safetensors"], "MISSING.safetensors"),
    (["--images", "NO_SUCH_FOLDER"], "NO_SUCH_FOLDER"),
])
def test_bad_options_exit_2_with_one_line(pool, tmp_path, capsys, bad, says):
    args = {"--weights": str(pool["weights"]), "--images": str(pool["images"]), "--out": str(tmp_path / "out")}
    extra = []
    for flag, value in zip(bad[::2], bad[1::2]):
        if flag in args:
            args[flag] = str(tmp_path / value)
        else:
            extra += [flag, value]
    argv = [x for pair in args.items() for x in pair] + extra
    try:
        status = pseudo_label.main(argv)
    except SystemExit as exit_:  # argparse's checks of option values
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and err.startswith("wsshm-pseudo-label: error:")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_killed_run_resumes(pool, labelled, tmp_path, monkeypatch, capsys):
    """Killed while predicting, then after converting but before pseudo.json: each rerun continues
    where the last stopped (no photo predicted twice) and ends with the same folder."""
    real_predict, real_convert = pseudo_label.predict_with_scores, pseudo_label.convert
    predicted = []

    def predict(model, images, *args, **kwargs):
        if len(predicted) >= 4:
            raise KeyboardInterrupt
        predicted.extend(images)
        return real_predict(model, images, *args, **kwargs)

    def convert_then_die(*args, **kwargs):
        real_convert(*args, **kwargs)
        raise KeyboardInterrupt

    out = tmp_path / "resumed"
    monkeypatch.setattr(pseudo_label, "predict_with_scores", predict)
    assert run(pool, out, "--batch-size", "1") == 130  # chunks of 4 photos: the second chunk is never predicted
    assert len(predicted) == 4 and not (out / "manifest.json").exists()
    assert "run the same command again" in capsys.readouterr().err
    monkeypatch.setattr(pseudo_label, "convert", convert_then_die)
    predicted.clear()
    monkeypatch.setattr(pseudo_label, "predict_with_scores", lambda model, images, *a, **k: (
        predicted.extend(images), real_predict(model, images, *a, **k))[1])
    assert run(pool, out, "--batch-size", "1") == 130
    assert len(predicted) == 1  # only the photo the killed run had not predicted
    assert not (out / "pseudo.json").exists() and (out / pseudo_label.MASKS).is_dir()
    monkeypatch.setattr(pseudo_label, "convert", real_convert)
    predicted.clear()
    assert run(pool, out, "--batch-size", "1") == 0
    assert predicted == []
    assert verify(out) == [] and not (out / pseudo_label.MASKS).exists()
    resumed, whole = (json.loads((f / "pseudo.json").read_text()) for f in (out, labelled))
    assert resumed["counts"] == whole["counts"] and sorted(resumed["samples"]) == sorted(whole["samples"])
