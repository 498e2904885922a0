"""The fused Triton losses against the ``wsshm.losses`` reference: values and gradients.

On a CUDA machine the kernels run compiled; elsewhere they run on CPU tensors in Triton's interpreter
(``triton_on_cpu()``), which needs ``TRITON_INTERPRET=1`` in the environment before ``wsshm.kernels``
is imported (``make test`` sets it when there is no GPU). Without either, the kernel tests skip rather
than compare the reference with itself.

The reference runs on the same input values upcast to fp32 (SPEC: fp32 arithmetic after upcasting).
Tolerances: the loss agrees to rtol 1e-5 in every dtype (fp32 sums of the same terms, in another
order). Gradients: fp32 to rtol 1e-5; bf16 and fp16 gradients are the fp32 gradient rounded once to
nearest, so rtol 2**-8 (bf16) and 2**-11 (fp16); all plus 1e-5 of the largest gradient for the
summation order.
"""
import zlib

import pytest
import torch

import wsshm.kernels.fused as fused
from wsshm import losses
from wsshm.kernels import INTERPRET, fused_student_loss, fused_teacher_loss, triton_on_cpu

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
kernel_runs = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRET), reason="no CUDA and TRITON_INTERPRET=1 was not set at import")



@pytest.fixture(autouse=True)
def _kernels_on_cpu(request):
    """CPU tensors run the Triton kernels (interpreted), except in tests of the reference dispatch."""
    if HAS_CUDA or not INTERPRET or request.node.get_closest_marker("reference_dispatch"):
        yield
        return
    with triton_on_cpu():
        yield


SIZES = [(2, 1, 67, 131), (1, 1, 1, 9), (3, 1, 5, 1)]
EDGES = torch.tensor([0.0, 0.05, 0.95, 0.5, 1.0])


def _seed(*parts):
    return zlib.crc32(repr(parts).encode())


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _matte(shape, g, edges=0.5):
    """Random values in [0, 1], a fraction ``edges`` of them exactly 0, 0.05, 0.95, 0.5 or 1."""
    x = torch.rand(shape, generator=g)
    pick = torch.rand(shape, generator=g) < edges
    return torch.where(pick, EDGES[torch.randint(0, len(EDGES), shape, generator=g)], x)


def _prediction(shape, g, from_logits):
    return torch.randn(shape, generator=g) * 3 if from_logits else torch.rand(shape, generator=g)


def _leaf(x, dtype):
    return x.detach().to(DEVICE, dtype, copy=True).requires_grad_()


def _reference(loss, preds, others, from_logits, **kw):
    """The reference loss and its fp32 gradients, on the same input values upcast to fp32."""
    leaves = [p.detach().float().requires_grad_() for p in preds]
    probs = [x.sigmoid() if from_logits else x for x in leaves]
    value = loss(*probs, *others, **kw)
    value.backward()
    return value.detach(), [x.grad for x in leaves]


def _assert_close(value, grads, ref_value, ref_grads):
    assert value.dtype == torch.float32 and value.shape == ()
    torch.testing.assert_close(value.detach(), ref_value, rtol=1e-5, atol=1e-7)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        # fp32: summation order only. bf16/fp16: one rounding to nearest of the fp32 gradient.
        rtol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[got.dtype]
        atol = 1e-5 * want.abs().max().item() + 1e-12
        torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol)


def _check_teacher(shape, dtype, from_logits, seed, lam=0.01, P=None, Q=None, M=None):
    g = _gen(seed)
    P = _leaf(_prediction(shape, g, from_logits) if P is None else P, dtype)
    Q = _leaf(_prediction(shape, g, from_logits) if Q is None else Q, dtype)
    M = (_matte(shape, g) if M is None else M).to(DEVICE, dtype)
    value = fused_teacher_loss(P, Q, M, lam=lam, from_logits=from_logits)
    value.backward()
    ref = _reference(losses.teacher_loss, [P, Q], [M], from_logits, lam=lam)
    _assert_close(value, [P.grad, Q.grad], *ref)
    return value, P.grad, Q.grad


def _student_inputs(shape, g, dtype, mask_dtype):
    Mt = _matte(shape, g).to(DEVICE, dtype)
    At = _matte(shape, g).to(DEVICE, dtype)  # many exact 0.5s: ties with the threshold
    S = (torch.rand(shape, generator=g) > 0.5).to(DEVICE, mask_dtype or dtype)
    return Mt, At, S


def _check_student(shape, dtype, from_logits, threshold, seed, mask_dtype=None, P=None):
    g = _gen(seed)
    P = _leaf(_prediction(shape, g, from_logits) if P is None else P, dtype)
    Mt, At, S = _student_inputs(shape, g, dtype, mask_dtype)
    value = fused_student_loss(P, Mt, At, S, threshold=threshold, from_logits=from_logits)
    value.backward()
    ref = _reference(losses.student_loss, [P], [Mt, At, S], from_logits, threshold=threshold)
    _assert_close(value, [P.grad], *ref)
    return value, P.grad


@kernel_runs
@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("from_logits", [False, True])
def test_teacher_matches_reference(shape, dtype, from_logits):
    _check_teacher(shape, dtype, from_logits, seed=_seed(shape, dtype, from_logits))


@kernel_runs
@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("threshold", [0.5, None])
def test_student_matches_reference(shape, dtype, from_logits, threshold):
    seed = _seed(shape, dtype, from_logits, threshold)
    _check_student(shape, dtype, from_logits, threshold, seed)


@kernel_runs
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.bool])
@pytest.mark.parametrize("threshold", [0.5, None])
def test_student_accepts_uint8_and_bool_masks(mask_dtype, threshold):
    g = _gen(7)
    shape = (2, 1, 9, 17)
    P = _leaf(torch.rand(shape, generator=g), torch.float16)
    Mt = _matte(shape, g).to(DEVICE, torch.float16)
    At = (torch.rand(shape, generator=g) > 0.5).to(DEVICE, mask_dtype)
    S = (torch.rand(shape, generator=g) > 0.5).to(DEVICE, mask_dtype)
    value = fused_student_loss(P, Mt, At, S, threshold=threshold)
    value.backward()
    _assert_close(value, [P.grad], *_reference(losses.student_loss, [P], [Mt, At, S], False,
                                               threshold=threshold))


def _student_with_boundary(P, Q, Mt, At, S, **kw):
    return losses.student_loss(P, Mt, At, S, Q=Q, **kw)


@kernel_runs
@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("threshold", [0.5, None])
def test_student_boundary_term_matches_reference(shape, dtype, from_logits, threshold):
    """With the student's boundary map: its L1 to the band of the blended label, gradient in P and Q."""
    g = _gen(_seed(shape, dtype, from_logits, threshold, "Q"))
    P = _leaf(_prediction(shape, g, from_logits), dtype)
    Q = _leaf(_prediction(shape, g, from_logits), dtype)
    Mt, At, S = _student_inputs(shape, g, dtype, None)
    value = fused_student_loss(P, Mt, At, S, threshold=threshold, from_logits=from_logits, Q=Q, lam=0.3)
    value.backward()
    ref = _reference(_student_with_boundary, [P, Q], [Mt, At, S], from_logits, threshold=threshold, lam=0.3)
    _assert_close(value, [P.grad, Q.grad], *ref)
    assert Q.grad.abs().sum() > 0


@kernel_runs
def test_ties_give_sign_zero():
    """P == M on whole 2x2 blocks and Q == boundary_mask(M) exactly: every L1 term ties somewhere."""
    g = _gen(3)
    shape = (2, 1, 12, 20)
    blocks = _matte((2, 1, 6, 10), g, edges=0.8).repeat_interleave(2, 2).repeat_interleave(2, 3)
    P = torch.where(torch.rand(shape, generator=g) < 0.7, blocks, torch.rand(shape, generator=g))
    Q = losses.boundary_mask(blocks)
    _, dP, dQ = _check_teacher(shape, torch.float32, False, seed=0, P=P, Q=Q, M=blocks)
    assert (dQ == 0).float().mean() > 0.5  # the ties really were hit
    _check_student(shape, torch.float32, False, 0.5, seed=5, P=P)
    # Logits: equal logits against equal targets tie in the kernel and in the reference alike.
    logits = torch.randn((2, 1, 6, 10), generator=g).repeat_interleave(2, 2).repeat_interleave(2, 3)
    _check_teacher(shape, torch.float32, True, seed=0, P=logits, Q=logits, M=blocks)


@kernel_runs
@pytest.mark.parametrize("tile", [(8, 8, 16, 1), (4, 1, 16, 1)], ids=["blocks", "one-row-steps"])
def test_tile_borders_and_halo(monkeypatch, tile):
    """Small tiles put strip and row-block borders inside the image; (ROWS, 1, ...) is the GPU's
    mode, which carries each row's D to the next step instead of recomputing it."""
    monkeypatch.setattr(fused, "INTERPRET_TILE", tile)
    monkeypatch.setattr(fused, "GPU_TILE", tile)
    _check_teacher((1, 1, 11, 37), torch.float32, True, seed=11)
    _check_student((1, 1, 11, 37), torch.bfloat16, False, 0.5, seed=12)


@kernel_runs
def test_non_contiguous_inputs():
    g = _gen(4)
    base = torch.rand((2, 1, 40, 24), generator=g)
    P = base.to(DEVICE).transpose(2, 3).detach().requires_grad_()  # [2, 1, 24, 40], column-major
    Q_every_other = _leaf(torch.rand((4, 1, 24, 40), generator=g), torch.float32)
    Q = Q_every_other[::2]
    M = _matte((2, 1, 24, 80), g).to(DEVICE)[..., ::2]  # sliced after the move, which would copy
    assert not (P.is_contiguous() or Q.is_contiguous() or M.is_contiguous())
    value = fused_teacher_loss(P, Q, M)
    value.backward()
    ref = _reference(losses.teacher_loss, [P, Q], [M], False)
    _assert_close(value, [P.grad, Q_every_other.grad[::2]], *ref)
    assert torch.all(Q_every_other.grad[1::2] == 0)


@kernel_runs
def test_grad_output_scales_and_runs_are_deterministic():
    g = _gen(5)
    shape = (2, 1, 16, 24)
    P = _leaf(torch.randn(shape, generator=g), torch.float32)
    Mt, At, S = _student_inputs(shape, g, torch.float32, None)
    fused_student_loss(P, Mt, At, S, from_logits=True).backward()
    first = P.grad.clone()
    P.grad = None
    fused_student_loss(P, Mt, At, S, from_logits=True).backward()
    assert torch.equal(P.grad, first)  # no atomics: bit for bit the same
    P.grad = None
    (fused_student_loss(P, Mt, At, S, from_logits=True) * -2.5).backward()
    torch.testing.assert_close(P.grad, first * -2.5, rtol=1e-6, atol=0)


@kernel_runs
def test_second_backward_is_refused():
    P = _leaf(torch.rand((1, 1, 4, 4)), torch.float32)
    loss = fused_teacher_loss(P, torch.rand_like(P), torch.rand_like(P))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


@kernel_runs
def test_only_the_wanted_gradients_are_computed(monkeypatch):
    calls = []
    launch = fused._launch
    monkeypatch.setattr(fused, "_launch", lambda *a, **kw: calls.append(kw) or launch(*a, **kw))
    g = _gen(6)
    P, Q, M = (torch.rand((1, 1, 8, 8), generator=g).to(DEVICE) for _ in range(3))
    want = losses.teacher_loss(P, Q, M)
    P.requires_grad_()
    with torch.no_grad():  # validation: nothing computed or written
        loss = fused_teacher_loss(P, Q, M)
    assert not loss.requires_grad
    loss_p = fused_teacher_loss(P, Q, M)  # only P wants a gradient
    assert [(c["grad_p"], c["grad_q"]) for c in calls] == [(False, False), (True, False)]
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    loss_p.backward()
    assert P.grad is not None and Q.grad is None
    # The launcher itself returns no gradient tensors when none is asked for.
    value, dP, dQ = launch(P, M, M, M, Q, target=0, lam=0.01, threshold=None, from_logits=False,
                           grad_p=False, grad_q=False)
    assert dP is None and dQ is None
    torch.testing.assert_close(value, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("call, message", [
    (lambda x: fused_teacher_loss(x, x, x[:, :, :2]), "M has shape"),
    (lambda x: fused_teacher_loss(x[0], x[0], x[0]), r"shape \[B, 1, H, W\]"),
    (lambda x: fused_teacher_loss(x, x.double(), x), "Q has dtype torch.float64"),
    (lambda x: fused_teacher_loss(x, x, x.to(torch.uint8)), "M has dtype torch.uint8"),
    (lambda x: fused_student_loss(x.to(torch.uint8), x, x, x), "P has dtype torch.uint8"),
    (lambda x: fused_student_loss(x, x, x, x.to("meta")), "S is on meta"),
    (lambda x: fused_student_loss(x, x, x, x[:, :, :0]), "S has shape"),
    (lambda x: fused_student_loss(x[:, :, :0], x[:, :, :0], x[:, :, :0], x[:, :, :0]), "empty"),
    (lambda x: fused_teacher_loss(x, x.numpy(), x), "Q must be a torch.Tensor"),
])
def test_bad_inputs_are_named(call, message):
    x = torch.rand((2, 1, 5, 6))
    with pytest.raises((ValueError, TypeError), match=message):
        call(x)


@pytest.mark.reference_dispatch
def test_cpu_tensors_run_the_reference_outside_triton_on_cpu(monkeypatch):
    """Dispatch: CPU tensors go to wsshm.losses (logits handled), whatever TRITON_INTERPRET says."""
    monkeypatch.setattr(fused, "_launch", lambda *a, **k: pytest.fail("a kernel was launched"))
    g = torch.Generator().manual_seed(0)
    P, Q, M, S = (torch.rand(2, 1, 7, 9, generator=g) for _ in range(4))
    a = fused_teacher_loss(P, Q, M, from_logits=True)
    assert torch.equal(a, losses.teacher_loss(P.sigmoid(), Q.sigmoid(), M)), a
    b = fused_student_loss(P, M, Q, S.round(), threshold=None)
    assert torch.equal(b, losses.student_loss(P, M, Q, S.round(), None)), b


@pytest.mark.reference_dispatch
def test_triton_on_cpu_says_what_it_needs():
    if INTERPRET:
        with triton_on_cpu():
            assert fused._runs_triton(torch.zeros(1))
        assert not fused._runs_triton(torch.zeros(1))
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            with triton_on_cpu():
                pass


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_batch_on_gpu(dtype):
    _check_teacher((16, 1, 512, 512), dtype, True, seed=21)
    _check_student((16, 1, 512, 512), dtype, True, 0.5, seed=22)


@kernel_runs
def test_bf16_gradients_round_to_nearest_even():
    """Gradients are rounded like torch's fp32 -> bf16 cast, midpoints to even (the interpreter's
    own cast truncates; the kernels round in integer arithmetic)."""
    g = _gen(8)
    x = torch.cat([torch.ones(4), torch.randn(4000, generator=g)]).to(DEVICE, torch.bfloat16)
    for scale in (1.0 + 2.0**-8, 3.0 + 2.0**-7, -0.7):  # the first two land on exact midpoints
        want = (x.float() * scale).to(torch.bfloat16)
        got = x.clone()
        fused._scale_in_place(got, torch.tensor(scale, device=DEVICE))
        assert torch.equal(got, want), (scale, (got != want).sum().item())
