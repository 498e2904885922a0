"""Pins the reference math of SPEC section 2 on small hand-computed inputs."""
import pytest
import torch

from wsshm import losses


def t(rows):
    """A [1, 1, H, W] float64 tensor from a list of rows."""
    return torch.tensor(rows, dtype=torch.float64).view(1, 1, len(rows), len(rows[0]))


def test_boundary_mask_is_strict_and_compared_in_fp32():
    M = t([[0.0, 0.05, 0.0501, 0.5], [0.9499, 0.95, 1.0, 0.06]])
    assert losses.boundary_mask(M).view(-1).tolist() == [0, 0, 1, 1, 1, 0, 0, 1]
    # bf16 rounds 0.05 up to 0.050048828125 and 0.95 to 0.94921875: both are inside in fp32.
    edges = torch.tensor([0.05, 0.95], dtype=torch.bfloat16).view(1, 1, 1, 2)
    assert losses.boundary_mask(edges).view(-1).tolist() == [1, 1]
    # fp32 0.05 is 0.0500000007..., which is not > the fp32 constant 0.05.
    assert losses.boundary_mask(torch.tensor([[[[0.05, 0.95]]]])).sum().item() == 0


def test_boundary_mask_all_zero_when_matte_is_binary():
    M = (torch.rand(2, 1, 7, 9) > 0.5).float()
    assert losses.boundary_mask(M).sum().item() == 0


def test_mlb_blend_hard_and_soft():
    Mt = t([[0.3, 0.7, 0.2]])
    At = t([[0.9, 0.5, 0.2]])
    S = t([[1.0, 0.0, 1.0]])
    # Hard: H = At > 0.5 -> [1, 0, 0]: teacher where boundary, mask elsewhere (0.5 is not > 0.5).
    assert losses.mlb_blend(Mt, At, S).view(-1).tolist() == pytest.approx([0.3, 0.0, 1.0])
    # Soft: At*Mt + (1-At)*S.
    soft = [0.9 * 0.3 + 0.1 * 1.0, 0.5 * 0.7 + 0.5 * 0.0, 0.2 * 0.2 + 0.8 * 1.0]
    assert losses.mlb_blend(Mt, At, S, threshold=None).view(-1).tolist() == pytest.approx(soft)
    assert losses.mlb_blend(Mt, At, S, threshold=0.1).view(-1).tolist() == pytest.approx([0.3, 0.7, 0.2])


def test_mse_and_grad_hand_computed():
    P = t([[0.0, 1.0, 0.5], [0.5, 0.5, 0.0]])
    T = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert losses.mse_loss(P, T).item() == pytest.approx((1 + 0.25 + 0.25 + 0.25) / 6)
    # dx: row0 [1, -0.5], row1 [0, -0.5] -> mean |.| over 4 = 0.5; dy: [0.5, -0.5, -0.5] -> 0.5
    assert losses.grad_loss(P, T).item() == pytest.approx(0.5 + 0.5)
    assert losses.matte_loss(P, T).item() == pytest.approx(1.75 / 6 + 1.0)


def test_grad_terms_vanish_on_length_one_axes():
    row = t([[0.0, 1.0, 0.0]])  # H = 1: only dx counts
    assert losses.grad_loss(row, torch.zeros_like(row)).item() == pytest.approx(1.0)
    col = t([[0.0], [1.0], [1.0]])  # W = 1: only dy counts
    assert losses.grad_loss(col, torch.zeros_like(col)).item() == pytest.approx(0.5)
    one = t([[0.7]])
    assert losses.grad_loss(one, torch.zeros_like(one)).item() == 0.0
    assert losses.matte_loss(one, torch.zeros_like(one)).item() == pytest.approx(0.49)


def test_teacher_loss_adds_weighted_boundary_l1():
    M = t([[0.0, 0.5], [1.0, 0.5]])
    P = M.clone()
    Q = t([[0.0, 1.0], [0.25, 0.5]])
    # matte_loss is 0; boundary label [0, 1, 0, 1]; |label - Q| = [0, 0, 0.25, 0.5] -> mean 0.1875.
    assert losses.teacher_loss(P, Q, M).item() == pytest.approx(0.01 * 0.1875)
    assert losses.teacher_loss(P, Q, M, lam=1.0).item() == pytest.approx(0.1875)


def test_student_and_pretrain_losses():
    Mt, At, S = t([[0.4, 0.9]]), t([[0.8, 0.1]]), t([[1.0, 0.0]])
    P = t([[0.4, 0.5]])  # target [0.4, 0.0]
    assert losses.student_loss(P, Mt, At, S).item() == pytest.approx(0.25 / 2 + 0.5)
    assert losses.pretrain_loss(P, S).item() == pytest.approx((0.36 + 0.25) / 2)


def test_student_boundary_term_is_the_band_of_the_blended_label():
    Mt, At, S = t([[0.4, 0.9], [0.5, 0.02]]), t([[0.8, 0.1], [0.9, 0.7]]), t([[1.0, 0.0], [0.0, 1.0]])
    P = t([[0.4, 0.0], [0.5, 0.02]])  # equals the blended label [0.4, 0.0, 0.5, 0.02]: matte loss 0
    Q = t([[0.5, 0.5], [1.0, 0.0]])
    # band of the label: [1, 0, 1, 0] (0.02 is below 0.05 although the blend took the teacher there)
    # |band - Q| = [0.5, 0.5, 0, 0] -> mean 0.25
    assert losses.student_loss(P, Mt, At, S, Q=Q, lam=1.0).item() == pytest.approx(0.25)
    assert losses.student_loss(P, Mt, At, S, Q=Q).item() == pytest.approx(0.0025)
    assert losses.student_loss(P, Mt, At, S).item() == 0.0


def test_targets_carry_no_gradient_and_ties_have_zero_subgradient():
    P = torch.full((1, 1, 3, 3), 0.5, dtype=torch.float64, requires_grad=True)
    T = torch.full((1, 1, 3, 3), 0.5, dtype=torch.float64, requires_grad=True)
    losses.matte_loss(P, T).backward()
    assert T.grad is None
    assert torch.count_nonzero(P.grad) == 0  # P == T: mse gradient 0 and sign(0) = 0


def test_low_precision_inputs_are_computed_in_fp32():
    P = torch.rand(2, 1, 5, 6)
    M = torch.rand(2, 1, 5, 6)
    ref = losses.matte_loss(P.bfloat16().float(), M.bfloat16().float())
    out = losses.matte_loss(P.bfloat16(), M.bfloat16())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("shape", [(2, 1, 5, 7), (1, 1, 1, 6), (3, 1, 4, 1)])
def test_gradcheck_float64(shape):
    g = torch.Generator().manual_seed(0)
    P = torch.rand(shape, generator=g, dtype=torch.float64, requires_grad=True)
    Q = torch.rand(shape, generator=g, dtype=torch.float64, requires_grad=True)
    # Keep |dP - dT| away from 0 so the L1 terms are differentiable where finite differences probe.
    M = torch.rand(shape, generator=g, dtype=torch.float64) + 2.0 * torch.arange(shape[-1], dtype=torch.float64)
    Mt, At = torch.rand(shape, generator=g, dtype=torch.float64), torch.rand(shape, generator=g, dtype=torch.float64)
    S = (torch.rand(shape, generator=g) > 0.5).double()
    assert torch.autograd.gradcheck(lambda p, q: losses.teacher_loss(p, q, M), (P, Q))
    assert torch.autograd.gradcheck(lambda p: losses.student_loss(p * 0.1, Mt, At, S), (P,))
    assert torch.autograd.gradcheck(lambda p, q: losses.student_loss(p * 0.1, Mt, At, S, Q=q), (P, Q))
    assert torch.autograd.gradcheck(lambda p: losses.pretrain_loss(p, S), (P,))
