"""The SPEC's test-time protocol: the size rule, the resize-predict-resize pipeline, batching."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsshm.image import IMAGENET_MEAN, IMAGENET_STD, normalize_uint8
from wsshm.inference import network_input, predict_matte, predict_mattes, test_time_size
from wsshm.models import build_model


@pytest.mark.parametrize("size,expected", [
    ((512, 512), (512, 512)),
    ((1080, 1920), (512, 896)),   # 910.2 -> 896
    ((1920, 1080), (896, 512)),
    ((500, 333), (768, 512)),     # 768.8 -> 768
    ((512, 528), (512, 544)),     # exactly 16.5 multiples: halves round up
    ((512, 520), (512, 512)),     # 16.25 -> 16
    ((3, 4), (512, 672)),         # 682.7 -> 672
    ((1024, 2047), (512, 1024)),  # 1023.5 -> 1024
])
def test_test_time_size(size, expected):
    assert test_time_size(*size) == expected


def test_test_time_size_is_at_least_one_multiple_and_rejects_empty():
    assert test_time_size(100, 1000, short_side=8) == (32, 96)  # 8 -> 0 multiples -> 32; 80 -> 96
    assert test_time_size(40, 41, short_side=64, multiple=16) == (64, 64)
    with pytest.raises(ValueError, match="positive"):
        test_time_size(0, 10)


class RedChannel(nn.Module):
    """A student whose single-tensor matte is the input's red channel back in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return (x[:, :1] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * self.scale


def test_no_resize_when_the_image_already_has_the_test_size():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    matte = predict_matte(RedChannel(), image, short_side=64)
    assert matte.dtype == np.float32 and matte.shape == (64, 96)
    np.testing.assert_allclose(matte, image[..., 0] / 255.0, atol=1e-6)


def test_matte_comes_back_at_the_image_size_bilinearly():
    # a 50 x 75 image -> 64 x 96 (short side 64) -> back to 50 x 75 with align_corners=False
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(50, 75, 3), dtype=np.uint8)
    matte = predict_matte(RedChannel(), image, short_side=64)
    red = torch.from_numpy(image[..., 0] / 255.0).float()[None, None]
    up = F.interpolate(red, size=(64, 96), mode="bilinear", align_corners=False, antialias=True)
    expected = F.interpolate(up, size=(50, 75), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(matte, expected, atol=1e-5)
    assert np.abs(matte - image[..., 0] / 255.0).mean() > 1e-3  # the round trip did change it


def test_output_is_clipped_to_unit_range():
    image = np.full((32, 32, 3), 255, dtype=np.uint8)
    student = RedChannel()
    with torch.no_grad():
        student.scale.fill_(3.0)
    assert predict_matte(student, image, short_side=32).max() == 1.0


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    model = build_model("unet_r18_w0.125")
    # a few train-mode batches give BatchNorm non-trivial running statistics
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 64, 64))
    return model.eval()


def test_real_network_follows_the_protocol(tiny_net):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    matte = predict_matte(tiny_net, image, short_side=64)
    x = normalize_uint8(torch.from_numpy(image))
    x = F.interpolate(x, size=test_time_size(45, 70, short_side=64), mode="bilinear", align_corners=False,
                      antialias=True)
    torch.testing.assert_close(network_input(image, short_side=64), x, rtol=0, atol=0)  # export calibrates on it
    with torch.no_grad():
        expected = F.interpolate(tiny_net(x)[0], size=(45, 70), mode="bilinear", align_corners=False)
    assert matte.shape == (45, 70) and matte.dtype == np.float32
    np.testing.assert_allclose(matte, expected[0, 0].numpy(), atol=1e-5)


def test_batching_keeps_order_and_matches_one_by_one(tiny_net):
    rng = np.random.default_rng(3)
    sizes = [(40, 60), (64, 64), (41, 61), (64, 96), (40, 60)]  # 40x60 and 41x61 share a test size
    images = [rng.integers(0, 256, size=(*s, 3), dtype=np.uint8) for s in sizes]
    batched = predict_mattes(tiny_net, images, short_side=64, batch_size=2)
    for image, matte in zip(images, batched):
        assert matte.shape == image.shape[:2]
        np.testing.assert_allclose(matte, predict_matte(tiny_net, image, short_side=64), atol=1e-5)
    assert np.abs(batched[0] - batched[4]).max() > 1e-4  # different photos, different mattes


def test_training_mode_is_restored_and_bf16_runs_close(tiny_net):
    image = np.random.default_rng(4).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    tiny_net.train()
    try:
        fp32 = predict_matte(tiny_net, image, short_side=64)
        assert tiny_net.training
        bf16 = predict_matte(tiny_net, image, short_side=64, dtype=torch.bfloat16)
    finally:
        tiny_net.eval()
    assert bf16.dtype == np.float32
    assert np.abs(bf16 - fp32).max() < 0.05


def test_bad_images_are_clear_errors():
    with pytest.raises(ValueError, match="image 1: expected uint8 H x W x 3"):
        predict_mattes(RedChannel(), [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match="float32"):
        predict_matte(RedChannel(), np.zeros((8, 8, 3), np.float32))
