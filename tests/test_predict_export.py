"""wsshm-predict on a few photos and bad inputs; wsshm-export round trip through onnxruntime."""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from wsshm.export import TOLERANCE_FP16, TOLERANCE_FP32, export_onnx, verify_onnx
from wsshm.export import main as export_main
from wsshm.image import normalize_uint8
from wsshm.inference import predict_matte
from wsshm.models import build_model, load_weights, save_weights
from wsshm.predict import collect_inputs, parse_colour
from wsshm.predict import main as predict_main

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
ARCH = "unet_r18_w0.125"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ARCH)
    with torch.no_grad():  # train-mode batches give BatchNorm non-trivial running statistics
        for _ in range(2):
            model(torch.randn(2, 3, 64, 64))
    path = tmp_path_factory.mktemp("weights") / "student.safetensors"
    save_weights(model.eval(), path)
    return path


@pytest.fixture
def photos(tmp_path):
    """Two real photos (when the data kit is there) and one generated, non-square one."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    demo = sorted((REALDATA / "p3m-demo" / "images").glob("*.jpg"))[:2]
    for i, source in enumerate(demo):
        with Image.open(source) as image:  # shrink so the test stays fast; the protocol still resizes
            image.convert("RGB").resize((image.width // 4, image.height // 4)).save(folder / f"real{i}.jpg")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(90, 130, 3), dtype=np.uint8)).save(folder / "sub" / "gen.png")
    return folder


def test_predict_writes_alpha_cutout_and_composite(weights, photos, tmp_path, capsys):
    out = tmp_path / "out"
    code = predict_main([str(photos), "--weights", str(weights), "--out", str(out), "--composite", "#00ff00",
                         "--short-side", "64"])
    assert code == 0
    names = sorted(p.relative_to(photos).with_suffix("").as_posix() for p in photos.rglob("*.*"))
    assert sorted(p.relative_to(out / "alpha").with_suffix("").as_posix()
                  for p in (out / "alpha").rglob("*.png")) == names
    model = load_weights(weights).eval()
    for name in names:
        source = next(photos.glob(f"{name}.*"))
        image = np.asarray(Image.open(source).convert("RGB"))
        alpha = np.asarray(Image.open(out / "alpha" / f"{name}.png"))
        cutout = np.asarray(Image.open(out / "cutout" / f"{name}.png"))
        composite = np.asarray(Image.open(out / "composite" / f"{name}.png")).astype(np.float64)
        assert alpha.shape == image.shape[:2] and alpha.dtype == np.uint8
        expected = np.round(predict_matte(model, image, short_side=64) * 255)
        assert np.abs(alpha.astype(np.float64) - expected).max() <= 1  # channels-last vs NCHW rounding
        assert cutout.shape == (*image.shape[:2], 4)
        np.testing.assert_array_equal(cutout[..., :3], image)
        np.testing.assert_array_equal(cutout[..., 3], alpha)
        a = expected[..., None] / 255
        green = a * image + (1 - a) * np.array([0, 255, 0])
        assert np.abs(composite - green).max() <= 2
    assert f"{len(names)} image(s) written" in capsys.readouterr().out
    assert not list(out.rglob("*.tmp"))


def test_predict_skips_unreadable_inputs_and_composites_on_an_image(weights, photos, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    background = tmp_path / "bg.png"
    Image.fromarray(np.full((10, 20, 3), 200, np.uint8)).save(background)
    good = photos / "sub" / "gen.png"
    out = tmp_path / "out"
    code = predict_main([str(broken), str(good), str(tmp_path / "missing.png"), "--weights", str(weights),
                         "--out", str(out), "--background", str(background), "--short-side", "64"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"{broken}: cannot read image" in err and f"{tmp_path / 'missing.png'}: no such file" in err
    assert sorted(p.name for p in (out / "alpha").iterdir()) == ["gen.png"]
    alpha = np.asarray(Image.open(out / "alpha" / "gen.png")).astype(np.float64)[..., None] / 255
    image = np.asarray(Image.open(good)).astype(np.float64)
    composite = np.asarray(Image.open(out / "composite" / "gen.png")).astype(np.float64)
    assert np.abs(composite - (alpha * image + (1 - alpha) * 200)).max() <= 1


def test_predict_fails_when_nothing_is_readable(weights, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    assert predict_main([str(broken), "--weights", str(weights), "--out", str(tmp_path / "out")]) == 1
    assert "0 image(s) written" in capsys.readouterr().out
    assert not (tmp_path / "out" / "alpha").exists()


def test_predict_reports_bad_weights_and_bad_options(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    assert predict_main([str(tmp_path), "--weights", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert str(bad) in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        predict_main([str(tmp_path), "--weights", str(bad), "--out", str(tmp_path / "o"), "--composite", "green"])
    assert exit_info.value.code == 2
    assert parse_colour("#00ff00") == (0, 255, 0) and parse_colour("FF8000") == (255, 128, 0)


def test_collect_inputs_names_folders_relatively_and_disambiguates(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / sub / "x.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    found, problems = collect_inputs([str(tmp_path / "a"), str(tmp_path / "b" / "x.png"), str(tmp_path / "nope")])
    assert [name for _, name in found] == ["x", "x-2"]
    assert problems == [f"{tmp_path / 'nope'}: no such file or folder"]


@pytest.fixture(scope="module")
def onnx_with_boundary(weights, tmp_path_factory):
    model = load_weights(weights).eval()
    path = tmp_path_factory.mktemp("onnx") / "student.onnx"
    export_onnx(model, str(path), with_boundary=True)
    return model, path


def test_export_round_trip_with_dynamic_batch_and_size(onnx_with_boundary):
    model, path = onnx_with_boundary
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == ["matte", "boundary"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True] and dims[1].dim_value == 3
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    for shape in [(3, 96, 160), (1, 64, 32)]:  # sizes and batches other than the traced 2 x 256 x 320
        x = normalize_uint8(torch.from_numpy(rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)))
        matte, boundary = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            expected_matte, expected_boundary = model(x)
        assert matte.shape == (shape[0], 1, *shape[1:])
        assert np.abs(matte - expected_matte.numpy()).max() <= TOLERANCE_FP32
        assert np.abs(boundary - expected_boundary.numpy()).max() <= TOLERANCE_FP32
        assert matte.std() > 1e-4  # a real, input-dependent output
    assert verify_onnx(model, str(path), with_boundary=True) <= TOLERANCE_FP32


def test_export_cli_fp16_matte_only(weights, tmp_path, capsys):
    path = tmp_path / "student-fp16.onnx"
    assert export_main(["--weights", str(weights), "--onnx", str(path), "--fp16"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime matches PyTorch" in printed
    worst = float(printed.split("max |difference| ")[1].split()[0])
    assert 1e-6 < worst <= TOLERANCE_FP16  # fp16 rounding shows, within the stated tolerance
    model = onnx.load(str(path))
    assert [o.name for o in model.graph.output] == ["matte"]
    assert {p.key: p.value for p in model.metadata_props}["arch"] == ARCH
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_export_cli_reports_bad_weights(tmp_path, capsys):
    bad = tmp_path / "missing.safetensors"
    assert export_main(["--weights", str(bad), "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_export_cli_int8_is_quantised_and_close(weights, tmp_path, capsys):
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(60 + 10 * i, 90, 3), dtype=np.uint8)).save(calibration / f"{i}.png")
    out = tmp_path / "out"
    path = out / "student-int8.onnx"
    assert export_main(["--weights", str(weights), "--onnx", str(path), "--int8",
                        "--calibration", str(calibration)]) == 0
    printed = capsys.readouterr().out
    mean = float(printed.split("mean |difference| ")[1].split()[0])
    assert 0 < mean <= 2e-2  # quantisation shows, within the stated tolerance
    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(init.data_type == onnx.TensorProto.INT8 for init in model.graph.initializer)
    assert sorted(p.name for p in out.iterdir()) == ["student-int8.onnx"]  # no temporary files left


def test_export_cli_int8_needs_calibration(weights, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--weights", str(weights), "--onnx", str(tmp_path / "x.onnx"), "--int8"])
    assert exit_info.value.code == 2
    assert export_main(["--weights", str(weights), "--onnx", str(tmp_path / "x.onnx"), "--int8",
                        "--calibration", str(tmp_path / "nowhere")]) == 2
    assert "calibration folder not found" in capsys.readouterr().err
