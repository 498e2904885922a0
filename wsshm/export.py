"""``wsshm-export``: a trained matting network as an ONNX file, checked against PyTorch.

The graph takes ``image``: float32 ``[batch, 3, height, width]``, RGB normalised with the ImageNet
mean/std (as in ``wsshm.image``), height and width multiples of 32, all three dynamic; it returns
``matte`` float32 ``[batch, 1, height, width]`` in [0, 1] (and ``boundary`` with ``--with-boundary``).
``--fp16`` stores fp16 weights and computes in fp16 (for GPUs) behind the same fp32 inputs/outputs.

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

from wsshm.image import IMAGENET_MEAN, IMAGENET_STD

# Max |onnxruntime - PyTorch| on the matte, both in [0, 1], for a random image.
TOLERANCE_FP32 = 1e-4
TOLERANCE_FP16 = 2e-2
MULTIPLE = 32


class ExportWrapper(nn.Module):
    """The network's outputs as the ONNX graph returns them (matte, or matte and boundary)."""

    def __init__(self, model: nn.Module, with_boundary: bool = False, fp16: bool = False):
        super().__init__()
        self.model = copy.deepcopy(model).half() if fp16 else model
        self.with_boundary = with_boundary
        self.fp16 = fp16

    def forward(self, image: torch.Tensor):
        out = self.model(image.half() if self.fp16 else image)
        if not isinstance(out, (tuple, list)):
            if self.with_boundary:
                raise ValueError("--with-boundary: this network returns only a matte")
            return out.float()
        return (out[0].float(), out[1].float()) if self.with_boundary else out[0].float()


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
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=directory)
    os.close(fd)
    try:
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
        program.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def verify_onnx(model: nn.Module, path: str, with_boundary: bool = False, fp16: bool = False,
                shapes=((2, 3, 192, 288), (1, 3, 320, 224)), seed: int = 0) -> float:
    """Largest |onnxruntime - PyTorch fp32| over the outputs for random images of ``shapes``.

    The fp32 reference is the model as given; for ``--fp16`` onnxruntime runs the fp16 graph, so
    the difference includes fp16 rounding. Raises ``AssertionError`` beyond the tolerance.
    """
    import onnxruntime as ort

    from wsshm.image import normalize_uint8

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(path, providers=providers)
    reference = ExportWrapper(model, with_boundary=with_boundary).eval()
    rng = np.random.default_rng(seed)
    worst = 0.0
    for shape in shapes:
        images = torch.from_numpy(rng.integers(0, 256, size=(shape[0], shape[2], shape[3], 3), dtype=np.uint8))
        x = normalize_uint8(images)
        got = session.run(None, {"image": x.numpy()})
        with torch.inference_mode():
            expected = reference(x)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for name, g, e in zip(("matte", "boundary"), got, expected):
            if g.shape != tuple(e.shape):
                raise AssertionError(f"{path}: {name} has shape {g.shape}, PyTorch gives {tuple(e.shape)}")
            worst = max(worst, float(np.abs(g - e.numpy()).max()))
    tolerance = TOLERANCE_FP16 if fp16 else TOLERANCE_FP32
    if worst > tolerance:
        raise AssertionError(f"{path}: onnxruntime differs from PyTorch by {worst:.3g} > {tolerance:g}")
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="wsshm-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="safetensors weights written by training")
    parser.add_argument("--onnx", required=True, help="output .onnx file")
    parser.add_argument("--with-boundary", action="store_true", help="also output the boundary map")
    parser.add_argument("--fp16", action="store_true", help="fp16 weights and compute (for GPUs)")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    args = parser.parse_args(argv)

    from wsshm.models import load_weights

    try:
        model = load_weights(args.weights, map_location="cpu").eval()
    except ValueError as error:
        print(f"wsshm-export: {error}", file=sys.stderr)
        return 2
    export_onnx(model, args.onnx, with_boundary=args.with_boundary, fp16=args.fp16, opset=args.opset)
    print(f"wrote {args.onnx} ({os.path.getsize(args.onnx) / 2**20:.1f} MiB, {getattr(model, 'arch', '?')}, "
          f"{'fp16' if args.fp16 else 'fp32'})")
    if args.no_verify:
        return 0
    try:
        worst = verify_onnx(model, args.onnx, with_boundary=args.with_boundary, fp16=args.fp16)
    except AssertionError as error:
        print(f"wsshm-export: check failed: {error}", file=sys.stderr)
        return 1
    tolerance = TOLERANCE_FP16 if args.fp16 else TOLERANCE_FP32
    print(f"onnxruntime matches PyTorch: max |difference| {worst:.2e} <= {tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
