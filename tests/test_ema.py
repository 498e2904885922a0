"""ModelEMA: exact averages, buffers, the fp32 master under a bf16 teacher, state round trip."""
import copy

import pytest
import torch
from torch import nn

from wsshm.ema import ModelEMA
from wsshm.models import build_model


class Tiny(nn.Module):
    def __init__(self, weight, mean=0.0, count=0):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight))
        self.register_buffer("running_mean", torch.tensor([mean]))
        self.register_buffer("num_batches_tracked", torch.tensor(count))


def set_student(student, weight, mean=0.0, count=0):
    with torch.no_grad():
        student.weight.copy_(torch.tensor(weight))
        student.running_mean.fill_(mean)
        student.num_batches_tracked.fill_(count)


def test_exact_averages_over_three_steps():
    teacher, student = Tiny([1.0, 2.0], mean=4.0, count=1), Tiny([0.0, 0.0])
    ema = ModelEMA(teacher, momentum=0.5)
    expected = []
    for weight, mean, count in (([3.0, -2.0], 0.0, 5), ([0.0, 0.0], 8.0, 6), ([4.0, 8.0], 2.0, 7)):
        set_student(student, weight, mean, count)
        ema.update(student)
        expected.append((teacher.weight.tolist(), float(teacher.running_mean), int(teacher.num_batches_tracked)))
    assert expected == [([2.0, 0.0], 2.0, 5), ([1.0, 0.0], 5.0, 6), ([2.5, 4.0], 3.5, 7)]
    assert ema.updates == 3
    assert teacher.num_batches_tracked.dtype == torch.int64
    assert teacher.weight.grad_fn is None and teacher.weight.requires_grad


def test_default_momentum_matches_the_closed_form():
    teacher, student = Tiny([0.0]), Tiny([1.0])
    ema = ModelEMA(teacher)
    assert ema.momentum == 0.999
    for _ in range(5):
        ema.update(student)
    # constant student s, start t0: t_n = s + (t0 - s) * m^n
    assert float(teacher.weight.detach()) == pytest.approx(1.0 - 0.999 ** 5, abs=1e-7)
    assert float(teacher.weight.detach()) == pytest.approx(0.004990009990, abs=1e-7)


def test_bf16_teacher_keeps_an_fp32_master():
    teacher, student = Tiny([1.0], mean=1.0).to(torch.bfloat16), Tiny([1.5], mean=1.5)
    ema = ModelEMA(teacher)
    for _ in range(20):
        ema.update(student)
    exact = 1.5 - 0.5 * 0.999 ** 20  # 1.0099046...; averaging in bf16 would stay at 1.0 forever
    assert ema.master["weight"].dtype == torch.float32
    assert float(ema.master["weight"]) == pytest.approx(exact, abs=1e-6)
    assert teacher.weight.dtype == torch.bfloat16
    assert float(teacher.weight.detach()) == float(torch.tensor(exact).to(torch.bfloat16)) == 1.0078125
    assert float(teacher.running_mean) == 1.0078125


def test_teacher_cast_after_construction_still_receives_buffers():
    """Training builds the EMA, then casts the teacher: .to() replaces buffer tensors."""
    teacher, student = Tiny([0.0], mean=0.0), Tiny([2.0], mean=2.0)
    ema = ModelEMA(teacher, momentum=0.75)
    teacher.to(torch.bfloat16)
    ema.update(student)
    assert teacher.running_mean.dtype == torch.bfloat16
    assert float(teacher.running_mean) == 0.5 and float(teacher.weight.detach()) == 0.5


def test_named_pairs_equal_module_update():
    torch.manual_seed(0)
    student = build_model("unet_r18_w0.125")
    base = build_model("unet_r18_w0.125")
    teacher_a, teacher_b = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        student.encoder.bn1.running_var.fill_(3.0)
    ModelEMA(teacher_a, momentum=0.9).update(student)
    ModelEMA(teacher_b, momentum=0.9).update(list(student.named_parameters()) + list(student.named_buffers()))
    s, t0, b = student.state_dict(), base.state_dict(), teacher_b.state_dict()
    for name, value in teacher_a.state_dict().items():
        assert torch.equal(value, b[name]), name
        if value.is_floating_point():
            expected = 0.9 * t0[name].double() + 0.1 * s[name].double()
            assert float((value.double() - expected).abs().max()) <= 1e-6 * (1 + float(expected.abs().max())), name
        else:
            assert torch.equal(value, s[name]), name
    assert float(teacher_a.encoder.bn1.running_var[0]) == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)


def test_state_dict_round_trip_resumes_identically():
    teacher, student = Tiny([1.0, 2.0]), Tiny([3.0, 5.0], mean=1.0, count=2)
    ema = ModelEMA(teacher, momentum=0.9)
    ema.update(student)
    ema.update(student)
    state = ema.state_dict()
    resumed_teacher = Tiny([0.0, 0.0])
    resumed = ModelEMA(resumed_teacher, momentum=0.5)
    resumed.load_state_dict(state)
    assert resumed.momentum == 0.9 and resumed.updates == 2
    assert torch.equal(resumed_teacher.weight, teacher.weight)
    set_student(student, [-1.0, 0.0], 4.0, 3)
    ema.update(student)
    resumed.update(student)
    assert torch.equal(resumed_teacher.weight, teacher.weight)
    assert torch.equal(resumed_teacher.running_mean, teacher.running_mean)
    state["master"]["weight"] += 1  # the saved state is a copy, not a view of the live master
    assert not torch.equal(ema.master["weight"], state["master"]["weight"])


def test_mismatches_are_clear_errors():
    ema = ModelEMA(Tiny([1.0, 2.0]))
    with pytest.raises(ValueError, match="missing.*running_mean"):
        ema.update([("weight", torch.zeros(2)), ("num_batches_tracked", torch.tensor(0))])
    partitioned = Tiny([1.0, 2.0])
    partitioned.weight.data = torch.empty(0)  # what a ZeRO-3 rank holds outside GatheredParameters
    with pytest.raises(ValueError, match=r"'weight' is \(0,\).*GatheredParameters"):
        ema.update(partitioned)
    with pytest.raises(ValueError, match="momentum"):
        ModelEMA(Tiny([1.0]), momentum=1.5)
    with pytest.raises(ValueError, match="differing names"):
        ema.load_state_dict({"momentum": 0.9, "updates": 0, "master": {"weight": torch.zeros(2)}})


def test_kept_prefixes_are_left_alone_and_the_rest_averaged():
    class Two(nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.body, self.head = Tiny(a, mean=a[0], count=1), Tiny(b, mean=b[0], count=1)

    teacher, student = Two([2.0], [4.0]), Two([0.0], [0.0])
    set_student(student.head, [100.0], 100.0, 9)
    ema = ModelEMA(teacher, momentum=0.5, keep=("head.",))
    ema.update(student)
    assert teacher.body.weight.tolist() == [1.0] and float(teacher.body.running_mean) == 1.0
    assert teacher.head.weight.tolist() == [4.0] and float(teacher.head.running_mean) == 4.0
    assert int(teacher.head.num_batches_tracked) == 1
