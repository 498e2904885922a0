"""wsshm._C: fused_prepare against its PyTorch reference (and the CUDA path on a GPU), the reference's
jitter against hand-computed values, torch.compile over the op, and nvcc builds of csrc/cuda/*.cu."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from wsshm import _C
from wsshm.data.prepare import fused_prepare, fused_prepare_reference
from wsshm.image import GREY_WEIGHTS, IMAGENET_MEAN, IMAGENET_STD, normalize_uint8

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_inputs(batch, height, width, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    u8 = lambda *shape: torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(device)  # noqa: E731
    jitter = torch.stack([torch.empty(batch).uniform_(0.6, 1.4, generator=g) for _ in range(3)]
                         + [torch.empty(batch).uniform_(-0.1, 0.1, generator=g)], dim=1).to(device)
    return u8(batch, height, width, 3), u8(batch, height, width), u8(batch, height, width, 3), jitter


CASES = {"plain": {}, "composite": {"alpha": 1, "background": 2}, "jitter": {"jitter": 3},
         "composite+jitter": {"alpha": 1, "background": 2, "jitter": 3}}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 37, 53), (2, 64, 33)])
def test_fused_prepare_matches_the_reference(case, shape):
    inputs = random_inputs(*shape, seed=sum(shape))
    kw = {name: inputs[i] for name, i in CASES[case].items()}
    got = fused_prepare(inputs[0], **kw)
    want = fused_prepare_reference(inputs[0], **kw)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.shape == (shape[0], 3, shape[1], shape[2]) and g.dtype == torch.float32
            torch.testing.assert_close(g, w, atol=5e-5, rtol=0)


def test_fused_prepare_bf16_and_strong_only():
    image, alpha, bg, jitter = random_inputs(2, 41, 29, seed=5)
    got = fused_prepare(image, alpha, bg, jitter, dtype=torch.bfloat16)
    want = fused_prepare_reference(image, alpha, bg, jitter)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w, atol=1e-6, rtol=8e-3)  # one bf16 rounding step
    plain, strong = fused_prepare(image, jitter=jitter, plain=False)
    assert plain is None
    torch.testing.assert_close(strong, fused_prepare_reference(image, jitter=jitter)[1], atol=5e-5, rtol=0)


def test_compositing_takes_the_foreground_where_alpha_is_255_and_the_background_where_0():
    image, alpha, bg, _ = random_inputs(2, 19, 23, seed=4)
    opaque = fused_prepare(image, torch.full_like(alpha, 255), bg)[0]
    torch.testing.assert_close(opaque, fused_prepare(image)[0], atol=1e-6, rtol=0)
    clear = fused_prepare(image, torch.zeros_like(alpha), bg)[0]
    torch.testing.assert_close(clear, fused_prepare(bg)[0], atol=1e-6, rtol=0)


def test_plain_view_is_wsshm_image_normalisation():
    image = random_inputs(2, 17, 19, seed=6)[0]
    torch.testing.assert_close(fused_prepare(image)[0], normalize_uint8(image), atol=1e-5, rtol=0)


def _strong(pixels, factors):
    image = torch.tensor(pixels, dtype=torch.uint8).view(1, 1, -1, 3)
    return fused_prepare(image, jitter=torch.tensor([factors], dtype=torch.float32), plain=False)[1]


def _unnormalise(x):
    from wsshm.image import denormalize

    return denormalize(x)[0, :, 0].T  # [pixels, 3] in [0, 1]


def test_jitter_steps_have_the_documented_effect():
    px = [[255, 0, 0], [0, 0, 255], [102, 51, 204]]
    identity = _unnormalise(_strong(px, [1, 1, 1, 0]))
    torch.testing.assert_close(identity, torch.tensor(px) / 255.0, atol=1e-6, rtol=0)
    half = _unnormalise(_strong(px, [0.5, 1, 1, 0]))
    torch.testing.assert_close(half, torch.tensor(px) / 510.0, atol=1e-6, rtol=0)
    grey = _unnormalise(_strong(px, [1, 1, 0, 0]))  # saturation 0: every channel is the grey value
    weights = torch.tensor(GREY_WEIGHTS)
    torch.testing.assert_close(grey, ((torch.tensor(px) / 255.0) @ weights)[:, None].expand(3, 3), atol=1e-6, rtol=0)
    flat = _unnormalise(_strong(px, [1, 0, 1, 0]))  # contrast 0: the image's mean grey everywhere
    mean_grey = ((torch.tensor(px) / 255.0) @ weights).mean()
    torch.testing.assert_close(flat, mean_grey.expand(3, 3), atol=1e-6, rtol=0)
    rotated = _unnormalise(_strong(px, [1, 1, 1, 1 / 3]))  # a third of a turn: red -> green, blue -> red
    torch.testing.assert_close(rotated[:2], torch.tensor([[0.0, 1, 0], [1, 0, 0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotated[2], torch.tensor([204, 102, 51]) / 255.0, atol=1e-5, rtol=0)


def test_the_op_uses_the_grey_weights_it_is_given():
    image = torch.tensor([[255, 0, 0], [0, 0, 255], [102, 51, 204]], dtype=torch.uint8).view(1, 1, 3, 3)
    desaturate = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # saturation 0: every channel is the grey value
    red_only = torch.ops.wsshm.fused_prepare(image, None, None, desaturate, False, False, (0.0,) * 3,
                                             (1.0,) * 3, (1.0, 0.0, 0.0))[1]
    torch.testing.assert_close(red_only[0, :, 0], (image[0, 0, :, :1].float() / 255).T.expand(3, 3),
                               atol=1e-6, rtol=0)


def test_torch_compile_traces_fused_prepare_in_one_graph():
    image, alpha, bg, jitter = random_inputs(2, 16, 24, seed=7)

    def views(image, alpha, bg, jitter):
        plain, strong = fused_prepare(image, alpha, bg, jitter)
        return plain - strong, fused_prepare(image, jitter=jitter, plain=False, dtype=torch.bfloat16)[1]

    compiled = torch.compile(views, fullgraph=True, backend="aot_eager")  # the fake op, no codegen
    for got, want in zip(compiled(image, alpha, bg, jitter), views(image, alpha, bg, jitter)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_the_op_passes_torch_library_opcheck():
    # schema, autograd registration, and the fake implementation against the kernel (dynamic shapes too)
    image, alpha, bg, jitter = random_inputs(2, 8, 6, seed=8)
    constants = (IMAGENET_MEAN, IMAGENET_STD, GREY_WEIGHTS)
    for args in [(image, alpha, bg, jitter, True, True), (image, None, None, jitter, False, False)]:
        torch.library.opcheck(torch.ops.wsshm.fused_prepare.default, args + constants)


def test_fused_prepare_rejects_bad_inputs():
    image, alpha, bg, jitter = random_inputs(2, 8, 8)
    with pytest.raises(RuntimeError, match="image must be uint8"):
        fused_prepare(image.float())
    with pytest.raises(RuntimeError, match="alpha and background go together"):
        fused_prepare(image, alpha=alpha)
    with pytest.raises(RuntimeError, match="jitter must be float32"):
        fused_prepare(image, jitter=jitter[:, :3])
    with pytest.raises(RuntimeError, match="background must be uint8"):
        fused_prepare(image, alpha, bg[:, :4])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_path_matches_the_reference(dtype):
    assert _C.build_info() == "cpu+cuda"
    image, alpha, bg, jitter = random_inputs(3, 257, 131, seed=9, device="cuda")
    for kw in ({}, {"alpha": alpha, "background": bg}, {"jitter": jitter}, {"alpha": alpha, "background": bg, "jitter": jitter}):
        got = fused_prepare(image, **kw, dtype=dtype)
        want = fused_prepare_reference(image.cpu(), **{k: v.cpu() for k, v in kw.items()})
        for g, w in zip(got, want):
            if w is not None:
                tol = {"atol": 1e-4, "rtol": 0} if dtype == torch.float32 else {"atol": 1e-4, "rtol": 8e-3}
                torch.testing.assert_close(g.float().cpu(), w, **tol)


@pytest.mark.gpu
@cuda
def test_a_failed_cuda_launch_raises():
    # gridDim.y is the batch and may not exceed 65535: the launch check must report the failed launch
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        fused_prepare(torch.zeros(65536, 1, 1, 3, dtype=torch.uint8, device="cuda"))
    torch.cuda.synchronize()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", sorted(p.name for p in (CSRC / "cuda").glob("*.cu")))
def test_cuda_sources_compile_for_sm80_and_sm90(source, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "-c", str(CSRC / "cuda" / source), "-o", str(tmp_path / "out.o"),
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.o").stat().st_size > 1000
