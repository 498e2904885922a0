"""``wsshm-export``: a trained matting network as an ONNX file, checked against PyTorch.

The graph takes ``image``: float32 ``[batch, 3, height, width]``, RGB normalised with the ImageNet
mean/std (as in ``wsshm.image``), height and width multiples of 32, all three dynamic; it returns
``matte`` float32 ``[batch, 1, height, width]`` in [0, 1] (and ``boundary`` with ``--with-boundary``).
``--fp16`` stores fp16 weights and computes in fp16 (for GPUs) behind the same fp32 inputs/outputs.
``--int8 --calibration DIR`` quantises the graph statically for CPUs (onnxruntime QDQ: int8 per-channel
weights, uint8 activations calibrated on a few of your photos), the fastest CPU path we measured
(docs/inference.md); its accuracy cost must be checked on your evaluation set.

We use the dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``, the default since torch
2.9): the TorchScript exporter is deprecated in torch 2.13 and warns so; the dynamo one expresses
"height is 32 * k" as a symbolic shape, so the traced graph holds for every such size.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

from wsshm.atomic import atomic_path
from wsshm.image import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, normalize_uint8, read_image
from wsshm.inference import MULTIPLE, network_input
from wsshm.models import load_weights, split_output

# Max |onnxruntime - PyTorch| on the matte, both in [0, 1], for a random image.
TOLERANCE_FP32 = 1e-4
TOLERANCE_FP16 = 2e-2
# int8 moves single pixels a lot more (0.39 at worst on the demo student); check the mean instead.
TOLERANCE_INT8_MEAN = 2e-2


def tolerance(fp16: bool = False, int8: bool = False) -> float:
    """What ``verify_onnx`` allows: the largest |difference| for fp32 and fp16, the mean one for int8."""
    return TOLERANCE_INT8_MEAN if int8 else TOLERANCE_FP16 if fp16 else TOLERANCE_FP32


class ExportWrapper(nn.Module):
    """The network's outputs as the ONNX graph returns them (matte, or matte and boundary)."""

    def __init__(self, model: nn.Module, with_boundary: bool = False, fp16: bool = False):
        super().__init__()
        self.model = copy.deepcopy(model).half() if fp16 else model
        self.with_boundary = with_boundary
        self.fp16 = fp16

    def forward(self, image: torch.Tensor):
        matte, boundary = split_output(self.model(image.half() if self.fp16 else image))
        if not self.with_boundary:
            return matte.float()
        if boundary is None:
            raise ValueError("--with-boundary: this network returns only a matte")
        return matte.float(), boundary.float()


def export_onnx(model: nn.Module, path: str, with_boundary: bool = False, fp16: bool = False,
                opset: int = 18, sample_size: tuple[int, int] = (256, 320)) -> None:
    """Write ``model`` to ``path`` (atomically) with dynamic batch, height and width."""
    wrapper = ExportWrapper(model, with_boundary=with_boundary, fp16=fp16).eval()
    # batch 2 in the sample: torch.export specialises a dimension traced at size 1
    sample = torch.randn(2, 3, *sample_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    height = torch.export.Dim("height_div32", min=1, max=512)
    width = torch.export.Dim("width_div32", min=1, max=512)
    outputs = ["matte", "boundary"] if with_boundary else ["matte"]
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export's FutureWarnings about pytree internals
            program = torch.onnx.export(
                wrapper, (sample,), dynamo=True, opset_version=opset, input_names=["image"],
                output_names=outputs, verbose=False,
                dynamic_shapes={"image": {0: batch, 2: MULTIPLE * height, 3: MULTIPLE * width}})
        program.model.metadata_props.update({
            "arch": str(getattr(model, "arch", type(model).__name__)),
            "input": "RGB, (x/255 - mean) / std, NCHW float32, height and width multiples of 32",
            "mean": ",".join(map(str, IMAGENET_MEAN)),
            "std": ",".join(map(str, IMAGENET_STD)),
            "precision": "fp16" if fp16 else "fp32",
        })
        program.save(str(tmp))


def calibration_inputs(folder: str, limit: int = 8) -> list[np.ndarray]:
    """Up to ``limit`` photos of ``folder``, read as every wsshm tool reads them (``read_image``) and
    shaped as the network sees them under the test-time protocol."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: calibration folder not found")
    files = sorted(f for f in os.listdir(folder) if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES)[:limit]
    inputs = []
    for name in files:
        photo = read_image(os.path.join(folder, name))  # a ValueError naming the file when unreadable
        inputs.append(network_input(photo).numpy())
    if not inputs:
        raise ValueError(f"{folder}: no calibration photos ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return inputs


def quantize_int8(fp32_path: str, int8_path: str, calibration: list[np.ndarray]) -> None:
    """Static QDQ int8 (per-channel int8 weights, uint8 activations) calibrated on ``calibration``."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"image": x} for x in calibration])

        def get_next(self):
            return next(self.items, None)

    directory = os.path.dirname(os.path.abspath(int8_path))
    with tempfile.TemporaryDirectory(dir=directory) as work:
        prepared = os.path.join(work, "prepared.onnx")
        quantized = os.path.join(work, "int8.onnx")
        quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, quantized, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        os.replace(quantized, int8_path)


def verify_onnx(model: nn.Module, path: str, with_boundary: bool = False, fp16: bool = False,
                shapes=((2, 3, 192, 288), (1, 3, 320, 224)), seed: int = 0, int8: bool = False) -> float:
    """Largest |onnxruntime - PyTorch fp32| over the outputs for random images of ``shapes``.

    The fp32 reference is the model as given; for ``--fp16`` onnxruntime runs the fp16 graph, so
    the difference includes fp16 rounding. Raises ``AssertionError`` beyond the tolerance. With
    ``int8`` the mean |difference| is checked (and returned) instead of the largest.
    """
    import onnxruntime as ort

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(path, providers=providers)
    reference = ExportWrapper(model, with_boundary=with_boundary).eval()
    rng = np.random.default_rng(seed)
    worst, total, count = 0.0, 0.0, 0
    for shape in shapes:
        images = torch.from_numpy(rng.integers(0, 256, size=(shape[0], shape[2], shape[3], 3), dtype=np.uint8))
        x = normalize_uint8(images)
        got = session.run(None, {"image": x.numpy()})
        with torch.inference_mode():
            expected = [e for e in split_output(reference(x)) if e is not None]
        for name, g, e in zip(("matte", "boundary"), got, expected):
            if g.shape != tuple(e.shape):
                raise AssertionError(f"{path}: {name} has shape {g.shape}, PyTorch gives {tuple(e.shape)}")
            difference = np.abs(g - e.numpy())
            worst = max(worst, float(difference.max()))
            total, count = total + float(difference.sum()), count + difference.size
    bound = tolerance(fp16, int8)
    if int8:
        mean = total / count
        if mean > bound:
            raise AssertionError(f"{path}: int8 onnxruntime differs from PyTorch by {mean:.3g} on average > {bound:g}")
        return mean
    if worst > bound:
        raise AssertionError(f"{path}: onnxruntime differs from PyTorch by {worst:.3g} > {bound:g}")
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="wsshm-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="safetensors weights written by training")
    parser.add_argument("--onnx", required=True, help="output .onnx file")
    parser.add_argument("--with-boundary", action="store_true", help="also output the boundary map")
    parser.add_argument("--fp16", action="store_true", help="fp16 weights and compute (for GPUs)")
    parser.add_argument("--int8", action="store_true", help="static int8 quantisation for CPUs (needs --calibration)")
    parser.add_argument("--calibration", help="folder of a few photos (not your evaluation set) to calibrate --int8")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    args = parser.parse_args(argv)
    if args.int8 and (args.fp16 or not args.calibration):
        parser.error("--int8 needs --calibration DIR and excludes --fp16")

    try:
        model = load_weights(args.weights, map_location="cpu").eval()
        calibration = calibration_inputs(args.calibration) if args.int8 else None
    except ValueError as error:
        print(f"wsshm-export: error: {error}", file=sys.stderr)
        return 2
    try:
        if args.int8:
            directory = os.path.dirname(os.path.abspath(args.onnx))
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory) as work:
                fp32_path = os.path.join(work, "fp32.onnx")
                export_onnx(model, fp32_path, with_boundary=args.with_boundary, opset=args.opset)
                quantize_int8(fp32_path, args.onnx, calibration)
        else:
            export_onnx(model, args.onnx, with_boundary=args.with_boundary, fp16=args.fp16, opset=args.opset)
    except OSError as error:  # a read-only or full disk, or a file where the folder should be
        print(f"wsshm-export: error: {args.onnx}: cannot write ({error.strerror or error})", file=sys.stderr)
        return 2
    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    print(f"wrote {args.onnx} ({os.path.getsize(args.onnx) / 2**20:.1f} MiB, {getattr(model, 'arch', '?')}, {precision})")
    if args.no_verify:
        return 0
    try:
        worst = verify_onnx(model, args.onnx, with_boundary=args.with_boundary, fp16=args.fp16, int8=args.int8)
    except AssertionError as error:
        print(f"wsshm-export: check failed: {error}", file=sys.stderr)
        return 1
    bound = tolerance(args.fp16, args.int8)
    if args.int8:
        print(f"onnxruntime int8 vs PyTorch fp32: mean |difference| {worst:.2e} <= {bound:g} "
              "(check the accuracy on your evaluation set)")
    else:
        print(f"onnxruntime matches PyTorch: max |difference| {worst:.2e} <= {bound:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
