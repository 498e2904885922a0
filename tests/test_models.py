"""The matting network, its registry, safetensors weights and torchvision encoder loading."""
import inspect
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import wsshm.models.io
from wsshm.models import (MattingNet, ResNetEncoder, build_model, canonical_arch, forward_maps, has_logits,
                          list_models, load_torchvision_encoder, load_weights, probabilities, register_model,
                          save_weights, split_output)

# torchvision.models.resnetN(): parameter count minus fc (fc = 512*1000+1000 or 2048*1000+1000) and
# len(state_dict()) including fc.weight/fc.bias, as torchvision reports them.
TORCHVISION = {18: (11_689_512 - 513_000, 122), 34: (21_797_672 - 513_000, 218),
               50: (25_557_032 - 2_049_000, 320), 101: (44_549_160 - 2_049_000, 626)}
# a few torchvision keys with their shapes
TORCHVISION_KEYS = {
    18: {"conv1.weight": (64, 3, 7, 7), "layer1.1.conv2.weight": (64, 64, 3, 3),
         "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer4.1.bn2.running_var": (512,)},
    50: {"layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer2.0.conv2.weight": (128, 128, 3, 3),
         "layer4.2.conv3.weight": (2048, 512, 1, 1)},
    101: {"layer3.22.bn3.running_mean": (1024,), "layer3.0.downsample.1.num_batches_tracked": ()},
}


def tiny(name="unet_r18_w0.25"):
    torch.manual_seed(0)
    return build_model(name)


@pytest.mark.parametrize("depth", sorted(TORCHVISION))
def test_encoder_matches_torchvision_resnet(depth):
    count, entries = TORCHVISION[depth]
    encoder = ResNetEncoder(depth)
    state = encoder.state_dict()
    assert sum(p.numel() for p in encoder.parameters()) == count
    assert len(state) + 2 == entries
    for key, shape in TORCHVISION_KEYS.get(depth, {}).items():
        assert tuple(state[key].shape) == shape, key
    assert not any("maxpool" in k or k.startswith("fc.") for k in state)


def test_width_multiplier_scales_every_encoder_width():
    encoder = ResNetEncoder(18, width=0.5)
    assert encoder.channels == [32, 32, 64, 128, 256]
    assert tuple(encoder.state_dict()["layer3.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert ResNetEncoder(50, width=0.25).channels == [16, 64, 128, 256, 512]


def test_encoder_strides_without_maxpool():
    encoder = ResNetEncoder(18, width=0.25).eval()
    with torch.no_grad():
        features = encoder(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in features] == [(32, 48), (32, 48), (16, 24), (8, 12), (4, 6)]
    assert [f.shape[1] for f in features] == encoder.channels


@pytest.mark.parametrize("name, shape", [("unet_r18_w0.25", (2, 3, 64, 96)), ("unet_r50_w0.125", (1, 3, 32, 64))])
def test_forward_shapes_ranges_and_logits(name, shape):
    model = tiny(name).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        matte, boundary = model(x)
        matte_logit, boundary_logit = model.forward_logits(x)
        assert has_logits(model)
        read_logits = forward_maps(model, x, logits=True)
    assert matte.shape == boundary.shape == (shape[0], 1, *shape[2:])
    assert 0 < float(matte.min()) and float(matte.max()) < 1
    torch.testing.assert_close(matte, torch.sigmoid(matte_logit))
    torch.testing.assert_close(boundary, torch.sigmoid(boundary_logit))
    torch.testing.assert_close(read_logits, (matte_logit, boundary_logit), rtol=0, atol=0)
    torch.testing.assert_close(probabilities(matte_logit, from_logits=True), matte)
    assert not torch.equal(matte, boundary)  # two distinct heads


def test_rejects_sides_not_multiples_of_the_stride():
    with pytest.raises(ValueError, match="multiples of 16.*64x72"):
        tiny()(torch.zeros(1, 3, 64, 72))


def test_trains_with_batch_one_and_gradients_reach_encoder_and_both_heads():
    model = tiny().train()
    matte, boundary = model(torch.randn(1, 3, 32, 64))
    (matte.mean() + boundary.mean()).backward()
    for param in (model.encoder.conv1.weight, model.aspp.pool[0].weight,
                  model.matte_head.logit.weight, model.boundary_head.logit.weight):
        assert param.grad is not None and float(param.grad.abs().sum()) > 0


def test_input_skip_reaches_the_output():
    """The full-resolution skip: changing one input pixel changes the matte at that pixel most."""
    model = tiny().eval()
    x = torch.zeros(1, 3, 64, 64)
    y = x.clone()
    y[0, :, 40, 21] = 3.0
    with torch.no_grad():
        delta = (model.forward_logits(y)[0] - model.forward_logits(x)[0]).abs()[0, 0]
    assert float(delta[40, 21]) > 0
    assert int(delta.argmax()) // 64 in range(38, 43)


def test_registry_names():
    assert canonical_arch("unet_r18_w0.50") == "unet_r18_w0.5"
    assert canonical_arch("unet_r101_w1.0") == "unet_r101"
    assert {"unet_r18", "unet_r18_w0.5", "unet_r34", "unet_r50", "unet_r101"} <= set(list_models())
    model = build_model("unet_r18_w0.5")
    assert model.arch == "unet_r18_w0.5" and isinstance(model, MattingNet)
    assert model.encoder.channels[0] == 32
    for bad in ("unet_r19", "unet_r18_w0", "resnet18", "unet_r18_wx"):
        with pytest.raises(ValueError, match="unknown model"):
            build_model(bad)


class MatteOnly(nn.Module):
    """A student from outside the package: one conv, a single sigmoid matte."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        self.channels = channels

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


def test_custom_student_registers_saves_and_loads(tmp_path):
    register_model("test_matte_only", MatteOnly)
    model = build_model("test_matte_only", channels=7)
    assert model.arch == "test_matte_only" and "test_matte_only" in list_models()
    assert not has_logits(model)
    with torch.no_grad():
        matte, boundary = forward_maps(model, torch.zeros(1, 3, 32, 32))
    assert boundary is None and matte.shape == (1, 1, 32, 32) and float(matte.max()) < 1
    save_weights(model, tmp_path / "custom.safetensors")
    loaded = load_weights(tmp_path / "custom.safetensors")
    assert isinstance(loaded, MatteOnly) and loaded.channels == 7
    torch.testing.assert_close(loaded.conv.weight, model.conv.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="built-in"):
        register_model("unet_r18", MatteOnly)


def test_split_output_and_probabilities():
    matte, boundary = torch.full((1, 1, 2, 2), 0.25), torch.full((1, 1, 2, 2), 0.75)
    assert split_output(matte) == (matte, None)
    assert split_output((matte, boundary)) == (matte, boundary)
    assert split_output([matte]) == (matte, None)
    for bad in ((matte, boundary, matte), {"matte": matte}):
        with pytest.raises(TypeError, match="matte tensor or \\(matte, boundary\\)"):
            split_output(bad)
    logit = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.bfloat16)
    p = probabilities(logit, from_logits=True)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, torch.tensor([0.1192029, 0.5, 0.9525741]))
    q = probabilities(torch.tensor([0.25], dtype=torch.float16), from_logits=False)
    assert q.dtype == torch.float32 and float(q) == 0.25
    double = torch.tensor([0.3], dtype=torch.float64)
    assert probabilities(double, from_logits=False) is double  # kept for gradcheck


def test_save_load_round_trip(tmp_path):
    model = build_model("unet_r18_w0.25", aspp_rates=(2, 4, 6)).eval()
    with torch.no_grad():  # non-default buffers, so a fresh network would not pass
        model.encoder.bn1.running_mean.uniform_(-1, 1)
    model.encoder.bn1.num_batches_tracked.fill_(17)
    path = tmp_path / "sub" / "w.safetensors"
    save_weights(model, path, metadata={"stage": "teacher", "steps": 12})
    assert sorted(os.listdir(path.parent)) == ["w.safetensors"]  # no temporary left behind
    loaded = load_weights(path).eval()
    assert loaded.arch == "unet_r18_w0.25"
    assert loaded.aspp.branches[3][0].dilation == (6, 6)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    from wsshm.models import read_weights
    _, meta = read_weights(path)
    assert meta["stage"] == "teacher" and meta["steps"] == "12" and meta["arch"] == "unet_r18_w0.25"


def test_bf16_weights_load_as_fp32(tmp_path):
    model = tiny().to(torch.bfloat16)
    save_weights(model, tmp_path / "bf16.safetensors")
    loaded = load_weights(tmp_path / "bf16.safetensors")
    assert loaded.encoder.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.encoder.conv1.weight, model.encoder.conv1.weight.float(), rtol=0, atol=0)


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ValueError, match=f"{missing}: no such weights file"):
        load_weights(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match=f"{corrupt}: not a readable safetensors file"):
        load_weights(corrupt)
    with pytest.raises(ValueError, match="has no .arch"):
        save_weights(nn.Linear(2, 2), tmp_path / "x.safetensors")


@pytest.mark.parametrize("metadata, message", [
    ({"arch": "unet_r7"}, "cannot build arch 'unet_r7'"),
    (None, "no 'arch'"),
    ({"arch": "unet_r18_w0.25"}, "the file does not hold a 'unet_r18_w0.25' network"),
])
def test_bad_metadata_errors_name_the_file(tmp_path, metadata, message):
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata=metadata)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        load_weights(path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_weights_never_unpickles(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "pickled.safetensors"
    with open(path, "wb") as handle:
        pickle.dump({"state": _Payload(str(marker))}, handle)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_weights(path)
    assert not marker.exists()
    source = inspect.getsource(wsshm.models.io)
    assert "pickle" not in source.replace("never pickle", "") and "torch.load" not in source


def test_load_torchvision_encoder_strict():
    torch.manual_seed(1)
    # a torchvision-shaped state dict: the width-1.0 encoder's names and shapes, random values, fc
    reference = ResNetEncoder(18)
    state = {k: (torch.randn_like(v) if v.is_floating_point() else torch.full_like(v, 5))
             for k, v in reference.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    model = build_model("unet_r18")
    decoder_before = model.aspp.project[0].weight.clone()
    load_torchvision_encoder(model, state)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(model.aspp.project[0].weight, decoder_before)

    del state["layer2.1.bn2.weight"]
    with pytest.raises(ValueError, match="layer2.1.bn2.weight"):
        load_torchvision_encoder(build_model("unet_r18"), state)
    state_w = {k: v for k, v in ResNetEncoder(18).state_dict().items()}
    with pytest.raises(ValueError, match="width 0.5"):
        load_torchvision_encoder(build_model("unet_r18_w0.5"), state_w)
    with pytest.raises(ValueError, match="no ResNet encoder"):
        load_torchvision_encoder(MatteOnly(), state_w)


def _virtual_memory_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


def test_tiny_file_claiming_a_huge_arch_is_refused_before_anything_is_allocated(tmp_path):
    # unet_r18_w1000 has ~147 GB of parameters; the file holds 8 bytes. The network is checked
    # against the file's header on the meta device, so not even the (random) initialisation runs.
    import resource
    path = tmp_path / "huge.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={"arch": "unet_r18_w1000", "arch_kwargs": "{}"})
    old = resource.getrlimit(resource.RLIMIT_AS)
    # 2 GB of head room: an attempt to build the network for real fails here instead of swapping the machine
    resource.setrlimit(resource.RLIMIT_AS, (_virtual_memory_bytes() + 2 * 2**30, old[1]))
    try:
        with pytest.raises(ValueError) as error:
            load_weights(path)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)
    message = str(error.value)
    assert message.startswith(f"{path}: the file does not hold a 'unet_r18_w1000' network") and "\n" not in message
    assert "1 unexpected tensor (w)" in message and "missing" in message


def test_shape_mismatches_are_named_in_one_line(tmp_path):
    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["encoder.conv1.weight"] = torch.zeros(1, 1)
    path = tmp_path / "mismatch.safetensors"
    save_file(state, path, metadata={"arch": "unet_r18_w0.25", "arch_kwargs": "{}"})
    with pytest.raises(ValueError) as error:
        load_weights(path)
    assert str(error.value) == (f"{path}: the file does not hold a 'unet_r18_w0.25' network its metadata names: "
                                "encoder.conv1.weight is 1x1 in the file, 16x3x7x7 in the network")


@pytest.mark.parametrize("arch_kwargs, message", [
    ('{"in_channels": "x"}', "arch keyword in_channels must be a positive integer, got 'x'"),
    ('{"aspp_rates": 5}', "arch keyword aspp_rates must be a list of positive integers, got 5"),
    ('{"aspp_rates": [1, "x"]}', r"arch keyword aspp_rates must be a list of positive integers, got \[1, 'x'\]"),
    ('{"depth": 5}', "arch keyword depth is given by the name unet_r18_w0.25"),
    ('{"foo": 1}', r"unknown arch keyword foo \(unet_r18_w0.25 takes aspp_rates, in_channels\)"),
    ('[1, 2]', r"arch_kwargs must be a JSON object, got \[1, 2\]"),
    ('{"a": ', "arch_kwargs is not JSON"),
])
def test_bad_arch_keywords_are_one_clear_error_naming_the_file(tmp_path, arch_kwargs, message):
    path = tmp_path / "kw.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={"arch": "unet_r18_w0.25", "arch_kwargs": arch_kwargs})
    with pytest.raises(ValueError, match=f"^{path}: cannot build arch 'unet_r18_w0.25': {message}") as error:
        load_weights(path)
    assert "\n" not in str(error.value)


def test_build_model_checks_unet_keywords():
    with pytest.raises(ValueError, match="^arch keyword in_channels must be a positive integer, got True"):
        build_model("unet_r18_w0.25", in_channels=True)
    with pytest.raises(ValueError, match="^arch keyword width is given by the name unet_r18"):
        build_model("unet_r18", width=2.0)
    assert build_model("unet_r18_w0.125", aspp_rates=(2, 4), in_channels=4).encoder.conv1.weight.shape[1] == 4
