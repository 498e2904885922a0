"""bench/bn_statistics.py's three ways of re-estimating BatchNorm statistics, on a network whose
statistics can be written down: one BatchNorm over an identity, fed constant batches."""
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bn_statistics as bn  # noqa: E402


def batches_of(means: list[float]) -> list[torch.Tensor]:
    """Batches of 4 samples x 1 channel x 2 x 2 whose channel mean is each value (variance 1)."""
    spread = torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).expand(4, 1, 2, 2)
    return [m + spread for m in means]


def test_the_three_estimates_follow_their_update_rules():
    model = nn.Sequential(nn.BatchNorm2d(1, momentum=0.1))
    means = [1.0 + 0.01 * i for i in range(30)]
    batches = batches_of(means)

    average = bn.track_statistics(model, batches, "fp32 recomputed")[0]
    torch.testing.assert_close(average.running_mean, torch.tensor([sum(means) / len(means)]))

    running = bn.track_statistics(model, batches, "fp32 running")[0]
    expected = 0.0
    for m in means:
        expected = 0.9 * expected + 0.1 * m
    torch.testing.assert_close(running.running_mean, torch.tensor([expected]))
    assert not running.training  # returned in evaluation mode

    # A slow drift (0.001 per batch): the fp32 average lags it by ~0.01, so each update is ~0.001,
    # below half a bf16 step near 1 (2^-8): a bf16 buffer stalls until the drift adds up.
    slow = batches_of([1.0 + 0.001 * i for i in range(60)])
    tracked = bn.track_statistics(model, slow, "fp32 running")[0].running_mean.item()
    stored = bn.track_statistics(model, slow, "bf16 running")[0].running_mean.item()
    simulated = torch.tensor(0.0)
    for x in slow:
        simulated = (0.9 * simulated + 0.1 * x.mean()).bfloat16().float()
    assert stored == torch.tensor(stored).bfloat16().float().item()  # a bf16 value
    assert abs(stored - simulated.item()) <= 2 ** -7  # the bf16 recursion, to within one step
    assert tracked - stored > 2 * 2 ** -7  # lost updates: the stored value lags by several steps
    assert model[0].running_mean.item() == 0.0  # the network given is left as it was


def test_rounding_once_and_the_drift_report():
    model = nn.Sequential(nn.BatchNorm2d(3))
    with torch.no_grad():
        model[0].running_mean.copy_(torch.tensor([1.0 + 2 ** -10, 0.5, 3.0]))
    rounded = bn.round_statistics_to_bf16(model)
    assert rounded[0].running_mean.tolist() == [1.0, 0.5, 3.0]
    changed, median, largest = bn.drift(bn.statistics(model), bn.statistics(rounded))
    assert abs(changed - 1 / 6) < 1e-6 and median == 0.0 and abs(largest - 2 ** -10 / (1 + 2 ** -10)) < 1e-7
