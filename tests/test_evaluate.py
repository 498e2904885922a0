"""wsshm-eval: the test-time protocol and metrics on tiny sets whose scores are known by hand."""
import contextlib
import json
import math
import os
import resource
import shutil
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from wsshm.evaluate import EvalDataError, evaluate_model, load_eval_set, main, markdown_table

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


class ConstantMatte(nn.Module):
    """Predicts the same value everywhere, so every metric has a closed form."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x):
        return torch.full_like(x[:, :1], self.value) + 0 * self.anchor


def write_set(root: Path, alphas: dict[str, np.ndarray]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "alphas").mkdir()
    for name, alpha in alphas.items():
        h, w = alpha.shape
        image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"{name}.jpg"), image)
        cv2.imwrite(str(root / "alphas" / f"{name}.png"), alpha)
    return root


def test_constant_prediction_gives_the_closed_form_scores(tmp_path):
    # a: all background; b: left half foreground, right half 128/255 (all of it a boundary region)
    a = np.zeros((64, 48), np.uint8)
    b = np.zeros((64, 48), np.uint8)
    b[:, :24] = 255
    b[:, 24:] = 128
    samples = load_eval_set(write_set(tmp_path / "set", {"a": a, "b": b}))
    assert [s.key for s in samples] == ["a", "b"]
    result = evaluate_model(ConstantMatte(0.5), samples, short_side=64, device="cpu", progress=False)
    by_key = {row["key"]: row for row in result["images"]}
    assert by_key["a"]["mse"] == pytest.approx(250.0, rel=1e-6)  # 0.25 * 1e3
    assert by_key["a"]["sad"] == pytest.approx(0.5 * 64 * 48 / 1e3, rel=1e-6)
    assert by_key["a"]["mad"] == pytest.approx(500.0, rel=1e-6)
    assert math.isnan(by_key["a"]["mse_boundary"])  # no boundary pixel in an all-zero alpha
    half = 0.5 - 128 / 255
    mse_b = (0.25 * 24 + half**2 * 24) / 48 * 1e3
    assert by_key["b"]["mse"] == pytest.approx(mse_b, rel=1e-5)
    assert by_key["b"]["mse_boundary"] == pytest.approx(half**2 * 1e3, rel=1e-4)
    assert by_key["b"]["sad_boundary"] == pytest.approx(abs(half) * 64 * 24 / 1e3, rel=1e-4)
    assert result["mean"]["mse"] == pytest.approx((250.0 + mse_b) / 2, rel=1e-5)
    assert result["mean"]["mse_boundary"] == pytest.approx(half**2 * 1e3, rel=1e-4)  # "a" left out
    assert result["skipped_boundary"] == 1
    assert [w[0].key for w in result["worst"]] == ["a", "b"]  # worst first
    table = markdown_table({"const": result}).splitlines()
    assert table[0].startswith("| model | images | MSE | SAD | MSE (boundary)")
    assert table[2].startswith(f"| const | 2 | {(250.0 + mse_b) / 2:.3f} | ")


def test_cli_writes_tables_and_sheet_for_a_shard_folder(tmp_path, monkeypatch):
    from wsshm.models import build_model, save_weights
    from wsshm.shards.cli import main as shard_main
    alpha = np.zeros((64, 48), np.uint8)
    alpha[16:48, 12:36] = 255
    alpha[16:48, 36:40] = 100
    src = write_set(tmp_path / "src", {"p0": alpha, "p1": alpha[::-1].copy(), "p2": alpha[:, ::-1].copy()})
    assert shard_main(["eval", "--images", str(src / "images"), "--alphas", str(src / "alphas"),
                       "--out", str(tmp_path / "shards"), "--workers", "1", "--no-progress"]) == 0
    torch.manual_seed(0)
    save_weights(build_model("unet_r18_w0.25"), tmp_path / "net.safetensors")
    out = tmp_path / "eval"
    code = main(["--weights", str(tmp_path / "net.safetensors"), "--data", str(tmp_path / "shards"),
                 "--out", str(out), "--short-side", "64", "--worst", "2"])
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["count"] == 3 and summary["arch"] == "unet_r18_w0.25"
    # the shard reader and the folder reader see the same pictures, so the same scores
    from wsshm.models import load_weights
    again = evaluate_model(load_weights(str(tmp_path / "net.safetensors")), load_eval_set(src), short_side=64,
                           device="cpu", progress=False)
    assert summary["mean"]["mse"] == pytest.approx(again["mean"]["mse"], rel=1e-3)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("key,mse,sad") and rows[-1].startswith("mean,") and len(rows) == 5
    assert "| net | 3 |" in (out / "metrics.md").read_text()
    sheet = cv2.imread(str(out / "worst.png"))
    assert sheet is not None and sheet.shape[0] == 2 * 160


def test_bad_data_fails_with_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "alphas").mkdir()
    with pytest.raises(EvalDataError, match="empty"):
        load_eval_set(tmp_path / "empty")
    with pytest.raises(EvalDataError, match="no such folder"):
        load_eval_set(tmp_path / "missing")
    assert main(["--weights", str(tmp_path / "none.safetensors"), "--data", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.safetensors" in err[0]


@pytest.mark.skipif(not (REALDATA / "p3m-demo").is_dir(), reason="shared/realdata is absent")
def test_real_portraits_read_as_a_folder_set():
    samples = load_eval_set(REALDATA / "p3m-demo", limit=3)
    assert len(samples) == 3
    for s in samples:
        assert s.image.dtype == np.uint8 and s.image.shape[:2] == s.alpha.shape
        assert 0.0 <= s.alpha.min() and s.alpha.max() <= 1.0 and s.alpha.std() > 0.1


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes in any file fail (EFBIG), as they fail on a full disk (ENOSPC)."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


@pytest.fixture
def weights_and_set(tmp_path):
    from wsshm.models import build_model, save_weights
    torch.manual_seed(0)
    save_weights(build_model("unet_r18_w0.125"), tmp_path / "net.safetensors")
    alpha = np.zeros((64, 48), np.uint8)
    alpha[16:48, 12:36] = 255
    return tmp_path / "net.safetensors", write_set(tmp_path / "set", {"p0": alpha, "p1": alpha[::-1].copy()})


def test_full_disk_is_one_line_exit_2_and_no_half_written_sheet(weights_and_set, tmp_path, capsys):
    weights, data = weights_and_set
    out = tmp_path / "eval"
    with file_size_limit(16 * 1024):  # the metrics files (< 1 KB) fit, worst.png (~55 KB of noise photos) does not
        code = main(["--weights", str(weights), "--data", str(data), "--out", str(out), "--short-side", "32"])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"wsshm-eval: error: {out / 'worst.png'}: cannot write (File too large)"]
    assert "wrote" not in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json", "metrics.md"]  # whole, no temporaries
    assert json.loads((out / "metrics.json").read_text())["count"] == 2


def test_out_that_cannot_be_a_folder_is_one_line_before_evaluating(weights_and_set, tmp_path, capsys, monkeypatch):
    weights, data = weights_and_set
    taken = tmp_path / "taken"
    taken.write_text("a file where the output folder should go")
    monkeypatch.setattr("wsshm.evaluate.evaluate_model", lambda *a, **k: pytest.fail("evaluated anyway"))
    assert main(["--weights", str(weights), "--data", str(data), "--out", str(taken / "eval")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wsshm-eval: error: {taken / 'eval'}: cannot create the output folder")
    assert taken.read_text() == "a file where the output folder should go"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_one_line(weights_and_set, tmp_path, capsys):
    weights, data = weights_and_set
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(["--weights", str(weights), "--data", str(data), "--out", str(out), "--short-side", "32"]) == 2
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and not list(out.iterdir())


def test_two_images_with_one_name_are_refused_naming_both(tmp_path, capsys):
    data = write_set(tmp_path / "set", {"a": np.zeros((8, 8), np.uint8)})
    cv2.imwrite(str(data / "images" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(EvalDataError) as error:
        load_eval_set(data)
    assert str(error.value) == (f"{data / 'images' / 'a.jpg'} and {data / 'images' / 'a.png'}: two images "
                                "with the key 'a' (one image per name)")


def test_a_key_in_two_shards_is_refused_naming_both(tmp_path):
    from wsshm.shards.cli import main as shard_main
    src = write_set(tmp_path / "src", {"p0": np.zeros((16, 16), np.uint8)})
    folder = tmp_path / "shards"
    assert shard_main(["eval", "--images", str(src / "images"), "--alphas", str(src / "alphas"),
                       "--out", str(folder), "--workers", "1", "--no-progress"]) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    first = manifest["shards"][0]
    second = dict(first, name=first["name"].replace("000000", "000001"))
    shutil.copy(folder / first["name"], folder / second["name"])
    for suffix in (".idx",):
        if (folder / first["name"]).with_suffix(suffix).exists():
            shutil.copy((folder / first["name"]).with_suffix(suffix), (folder / second["name"]).with_suffix(suffix))
    manifest["shards"].append(second)
    manifest["count"] *= 2
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EvalDataError) as error:
        load_eval_set(folder)
    assert str(error.value) == (f"{folder / first['name']} and {folder / second['name']}: two samples with the key "
                                "'p0' (one sample per key)")
