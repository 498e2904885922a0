"""wsshm-predict on a few photos and bad inputs; wsshm-export round trip through onnxruntime."""
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from test_evaluate import file_size_limit  # tests/ is on sys.path (no package)

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


def test_export_to_a_path_that_cannot_be_written_is_one_line(weights, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file where the output folder should go")
    assert export_main(["--weights", str(weights), "--onnx", str(taken / "x.onnx"), "--no-verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wsshm-export: error: {taken / 'x.onnx'}: cannot write"), err
    assert taken.read_text() == "a file where the output folder should go"


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


# ---- reading photos as the converter does; outputs that cannot be written ------------------------

def _photo_variants(folder: Path) -> dict[str, Path]:
    """The same 40x24 picture as 16-bit grey, 8-bit grey, RGBA, palette PNG and an EXIF-rotated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 65535, 40 * 24).reshape(24, 40).astype(np.uint16)
    rgb = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    paths = {name: folder / f"{name}.{ext}" for name, ext in
             (("grey16", "png"), ("grey8", "png"), ("rgba", "png"), ("palette", "png"), ("exif", "jpg"))}
    Image.fromarray(ramp).save(paths["grey16"])
    Image.fromarray((ramp // 257).astype(np.uint8)).save(paths["grey8"])
    Image.fromarray(np.dstack([rgb, np.full((24, 40), 7, np.uint8)])).save(paths["rgba"])
    Image.fromarray(rgb).convert("P").save(paths["palette"])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    Image.fromarray(rgb).save(paths["exif"], exif=exif.tobytes(), quality=95)
    return paths


def test_read_image_reads_every_kind_of_photo_as_the_converter_stores_it(tmp_path):
    from wsshm.image import read_image
    from wsshm.shards.images import load_rgb
    from wsshm.shards.reader import decode_image
    for name, path in _photo_variants(tmp_path).items():
        image = read_image(path)
        stored = decode_image(load_rgb(str(path)).data)  # what training and eval see
        assert image.dtype == np.uint8 and image.shape == stored.shape, name
        assert np.abs(image.astype(int) - stored).max() <= 1, name  # 16-bit: /256 vs /257 rounding
    grey16 = read_image(tmp_path / "grey16.png")
    assert grey16.shape == (24, 40, 3) and grey16[0, 0, 0] == 0 and grey16[-1, -1, 0] == 255
    assert 120 <= grey16[12, 0, 0] <= 130  # mid-grey, not the near-white of a clipped 16-bit read
    assert read_image(tmp_path / "exif.jpg").shape == (40, 24, 3)


def test_read_image_names_the_file_it_cannot_read(tmp_path):
    from wsshm.image import read_image
    empty, junk = tmp_path / "empty.png", tmp_path / "junk.jpg"
    empty.write_bytes(b"")
    junk.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=f"^{empty}: cannot read image \\(empty"):
        read_image(empty)
    with pytest.raises(ValueError, match=f"^{junk}: cannot read image"):
        read_image(junk)
    with pytest.raises(ValueError, match=f"^{tmp_path}: cannot read image"):
        read_image(tmp_path)


def test_predict_reads_a_16_bit_grey_png_as_grey(weights, tmp_path):
    photo = _photo_variants(tmp_path / "in")["grey16"]
    assert predict_main([str(photo), "--weights", str(weights), "--out", str(tmp_path / "out"),
                         "--short-side", "32"]) == 0
    cutout = np.asarray(Image.open(tmp_path / "out" / "cutout" / "grey16.png"))
    expected = np.linspace(0, 65535, 40 * 24).reshape(24, 40) / 257
    assert np.abs(cutout[..., 0] - expected).max() <= 1.5 and (cutout[..., 0] == cutout[..., 2]).all()


def test_predict_on_a_full_disk_is_one_line_and_leaves_no_partial_png(weights, tmp_path, capsys):
    photo = tmp_path / "noise.png"  # a noise cut-out PNG is ~240 KB; the matte is far smaller
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "out"
    with file_size_limit(64 * 1024):
        code = predict_main([str(photo), "--weights", str(weights), "--out", str(out), "--short-side", "32"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wsshm-predict: error: {out / 'cutout' / 'noise.png'}: cannot write (File too large)"]
    assert not (out / "cutout" / "noise.png").exists() and not [p for p in out.rglob("*") if p.name.startswith(".")]
    for png in out.rglob("*.png"):  # whatever has a final name is whole
        Image.open(png).load()


def test_predict_to_an_out_that_cannot_be_a_folder_is_one_line(weights, photos, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file where the output folder should go")
    assert predict_main([str(photos), "--weights", str(weights), "--out", str(taken / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wsshm-predict: error: {taken / 'sub'}: cannot create the output folder")
    assert taken.read_text() == "a file where the output folder should go"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_predict_to_a_read_only_out_is_one_line(weights, photos, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert predict_main([str(photos), "--weights", str(weights), "--out", str(out)]) == 2
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot" in err[0] and str(out) in err[0] and not list(out.iterdir())


def test_every_cli_refuses_a_tiny_file_naming_a_huge_network_in_one_line(photos, tmp_path, capsys):
    from safetensors.torch import save_file

    from wsshm.evaluate import main as eval_main
    huge = tmp_path / "huge.safetensors"  # 8 bytes of tensors naming a ~147 GB network
    save_file({"w": torch.zeros(2)}, huge, metadata={"arch": "unet_r18_w1000", "arch_kwargs": "{}"})
    runs = {"predict": lambda: predict_main([str(photos), "--weights", str(huge), "--out", str(tmp_path / "p")]),
            "export": lambda: export_main(["--weights", str(huge), "--onnx", str(tmp_path / "x.onnx")]),
            "eval": lambda: eval_main(["--weights", str(huge), "--data", str(photos), "--out", str(tmp_path / "e")])}
    for tool, run in runs.items():
        assert run() == 2, tool
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{huge}: the file does not hold a 'unet_r18_w1000' network" in err[0], tool
    assert not (tmp_path / "x.onnx").exists()
