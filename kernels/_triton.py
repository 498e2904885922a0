"""The Triton kernels: matte loss (+ boundary L1, + MLB blending) and its gradient in one pass.

One program owns ``ROWS`` rows of a ``BLOCK_W``-wide column strip of one image and walks down them
``ROWS_PER_STEP`` rows at a time (unrolled, so the compiler can issue many rows' loads at once). For
its pixels it forms ``D = P - T`` and the ``D`` of the one-pixel halo its formulas need (shifted loads
that hit L1), adds the pixels' loss terms into one weighted partial sum, and writes the gradient of
its own pixels:

    dL/dP[r,c] = 2 D[r,c]/N + (sign(D[r,c]-D[r,c-1]) - sign(D[r,c+1]-D[r,c])) / Nx
                            + (sign(D[r,c]-D[r-1,c]) - sign(D[r+1,c]-D[r,c])) / Ny

(the autograd gradient of ``wsshm.losses.matte_loss``; a missing neighbour drops its term). With one
row per step (the GPU tile) the row below is carried to the next step, so ``D`` is evaluated 3 times
per pixel (left, right, below) instead of 5; the interpreter's tile takes many rows per step, which
is fewer, larger operations. Each pixel's gradient is gathered by the one program that owns it: no
atomics, deterministic. The target ``T`` (the matte ``M``, or the MLB blend of ``Mt``, ``At``, ``S``)
is formed in registers and never stored. All arithmetic is fp32 in the reference's order; launch with
``enable_fp_fusion=False`` so no FMA changes a rounding and with it the sign of an exact tie.
"""
import triton
import triton.language as tl

# Globals a kernel reads must be tl.constexpr (the interpreter does not enforce it; the compiler does).
TARGET_MATTE = tl.constexpr(0)  # T = M (teacher)
TARGET_BLEND_HARD = tl.constexpr(1)  # T = H*Mt + (1-H)*S, H = At > threshold
TARGET_BLEND_SOFT = tl.constexpr(2)  # T = At*Mt + (1-At)*S
# How the sigmoid of a logit is taken. The PTX form saves ~30 instructions per pixel on a GPU (the
# kernel is close to compute-bound there); the interpreter cannot run inline PTX.
SIGMOID_TL = tl.constexpr(0)  # tl.sigmoid: 1 / (1 + exp(-x)) with div.full
SIGMOID_APPROX_DIV = tl.constexpr(1)  # tl.fdiv(approx=True), Triton >= 3.9
SIGMOID_PTX_FTZ = tl.constexpr(2)  # ex2.approx.ftz + rcp.approx.ftz (NVIDIA only)


@triton.jit
def _load_f32(base, offs, mask):
    return tl.load(base + offs, mask=mask, other=0).to(tl.float32)


@triton.jit
def _prediction(P, offs, mask, FROM_LOGITS: tl.constexpr, SIGMOID: tl.constexpr):
    """The prediction at ``offs``, 0 where ``mask`` is off (a masked logit loads as -inf)."""
    if FROM_LOGITS:
        p = tl.load(P + offs, mask=mask, other=float("-inf")).to(tl.float32)
    else:
        p = _load_f32(P, offs, mask)
    if FROM_LOGITS:
        if SIGMOID == SIGMOID_PTX_FTZ:  # one MUFU.EX2 + one MUFU.RCP, ~3 ulp
            e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r",
                                          [p * -1.4426950408889634], dtype=tl.float32,
                                          is_pure=True, pack=1)
            p = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + e],
                                          dtype=tl.float32, is_pure=True, pack=1)
        elif SIGMOID == SIGMOID_APPROX_DIV:
            p = tl.fdiv(1.0, 1.0 + tl.exp(-p), approx=True)
        else:
            p = tl.sigmoid(p)
    return p


@triton.jit
def _target(T0, t0_offs, At, at_offs, S, s_offs, mask, threshold, TARGET: tl.constexpr):
    t = _load_f32(T0, t0_offs, mask)
    if TARGET != TARGET_MATTE:
        a = _load_f32(At, at_offs, mask)
        s = _load_f32(S, s_offs, mask)
        if TARGET == TARGET_BLEND_HARD:
            t = tl.where(a > threshold, t, s)  # == H*Mt + (1-H)*S exactly, H in {0, 1}
        else:
            t = a * t + (1.0 - a) * s
    return t


@triton.jit
def _store(ptr, offs, x, mask):
    """Stores fp32 ``x`` rounded to nearest-even into ``ptr``'s dtype. bf16 is rounded in integer
    arithmetic (what the GPU's cvt.rn does) because Triton's interpreter truncates instead."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        tl.store(ptr + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sign(x):
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)  # sign(0) = 0, two compares, one add


@triton.jit
def _diff_at(P, sp_h, sp_w, T0, st_h, st_w, At, sa_h, sa_w, S, ss_h, ss_w, rows, cols, mask,
             threshold, FROM_LOGITS: tl.constexpr, TARGET: tl.constexpr, SIGMOID: tl.constexpr):
    """``D = P - T``, ``P`` and ``T`` at ``(rows, cols)``; all three are 0 where ``mask`` is off."""
    p = _prediction(P, rows * sp_h + cols * sp_w, mask, FROM_LOGITS, SIGMOID)
    t = _target(T0, rows * st_h + cols * st_w, At, rows * sa_h + cols * sa_w,
                S, rows * ss_h + cols * ss_w, mask, threshold, TARGET)
    return p - t, p, t


@triton.jit
def matte_loss_kernel(
    P, sp_b, sp_h, sp_w,
    T0, st_b, st_h, st_w,  # M (teacher) or Mt (student)
    At, sa_b, sa_h, sa_w,
    S, ss_b, ss_h, ss_w,
    Q, sq_b, sq_h, sq_w,  # boundary prediction (teacher only)
    dP, dQ, partials,
    H, W, threshold, boundary_low, boundary_high,
    inv_n, inv_nx, inv_ny, lam_inv_n,
    TARGET: tl.constexpr, WITH_BOUNDARY: tl.constexpr, FROM_LOGITS: tl.constexpr,
    GRAD_P: tl.constexpr, GRAD_Q: tl.constexpr, SIGMOID: tl.constexpr,
    ROWS: tl.constexpr, ROWS_PER_STEP: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_w = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # the batch offset is the only one that can pass 2**31
    P += b * sp_b
    T0 += b * st_b
    At += b * sa_b
    S += b * ss_b
    Q += b * sq_b
    dP += b * H * W  # gradients are written contiguous
    dQ += b * H * W

    cols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    in_cols = cols < W
    terms = tl.zeros([ROWS_PER_STEP, BLOCK_W], dtype=tl.float32)
    for step in tl.static_range(ROWS // ROWS_PER_STEP):
        rows = pid_h * ROWS + step * ROWS_PER_STEP + tl.arange(0, ROWS_PER_STEP)[:, None]
        here = in_cols & (rows < H)
        down = in_cols & (rows + 1 < H)
        right = here & (cols + 1 < W)
        if ROWS_PER_STEP == 1 and step > 0:
            # One row per step: this row's D and the sign above it come from the previous step.
            d, p, t, sign_up = d_down, p_down, t_down, sign_down  # noqa: F821 (set last step)
        else:
            d, p, t = _diff_at(P, sp_h, sp_w, T0, st_h, st_w, At, sa_h, sa_w, S, ss_h, ss_w,
                               rows, cols, here, threshold, FROM_LOGITS, TARGET, SIGMOID)
            up = in_cols & (rows >= 1) & (rows - 1 < H)
            d_up, _, _ = _diff_at(P, sp_h, sp_w, T0, st_h, st_w, At, sa_h, sa_w, S, ss_h, ss_w,
                                  rows - 1, cols, up, threshold, FROM_LOGITS, TARGET, SIGMOID)
            sign_up = tl.where(up, _sign(d - d_up), 0.0)  # the reference's dy D at (r-1, c)
        d_down, p_down, t_down = _diff_at(
            P, sp_h, sp_w, T0, st_h, st_w, At, sa_h, sa_w, S, ss_h, ss_w,
            rows + 1, cols, down, threshold, FROM_LOGITS, TARGET, SIGMOID)
        d_right, _, _ = _diff_at(P, sp_h, sp_w, T0, st_h, st_w, At, sa_h, sa_w, S, ss_h, ss_w,
                                 rows, cols + 1, right, threshold, FROM_LOGITS, TARGET, SIGMOID)
        ex = d_right - d  # the reference's dx D at (r, c), same fp32 operation
        ey = d_down - d
        # Each pixel's terms, pre-divided by their counts; one reduction at the end.
        terms += (d * d * inv_n + tl.where(right, tl.abs(ex), 0.0) * inv_nx
                  + tl.where(down, tl.abs(ey), 0.0) * inv_ny)
        out_offs = rows * W + cols
        if WITH_BOUNDARY:
            q = _prediction(Q, rows * sq_h + cols * sq_w, here, FROM_LOGITS, SIGMOID)
            e = ((t > boundary_low) & (t < boundary_high)).to(tl.float32) - q
            terms += tl.where(here, tl.abs(e), 0.0) * lam_inv_n
            if GRAD_Q:
                g_q = -_sign(e) * lam_inv_n
                if FROM_LOGITS:
                    g_q = g_q * (q * (1.0 - q))
                _store(dQ, out_offs, g_q, here)
        sign_down = tl.where(down, _sign(ey), 0.0)
        if GRAD_P:
            left = here & (cols >= 1)
            d_left, _, _ = _diff_at(P, sp_h, sp_w, T0, st_h, st_w, At, sa_h, sa_w, S, ss_h, ss_w,
                                    rows, cols - 1, left, threshold, FROM_LOGITS, TARGET, SIGMOID)
            g = 2.0 * d * inv_n
            g += (tl.where(left, _sign(d - d_left), 0.0) - tl.where(right, _sign(ex), 0.0)) * inv_nx
            g += (sign_up - sign_down) * inv_ny
            if FROM_LOGITS:
                g = g * (p * (1.0 - p))
            _store(dP, out_offs, g, here)

    tile = (pid_h + tl.num_programs(1) * tl.program_id(2)) * tl.num_programs(0) + pid_w
    tl.store(partials + tile, tl.sum(tl.reshape(terms, [ROWS_PER_STEP * BLOCK_W]), axis=0))


@triton.jit
def scale_in_place_kernel(X, scale, n, BLOCK: tl.constexpr):
    """``X *= scale[0]``, skipped without touching ``X`` when the scale is 1 (plain ``.backward()``),
    so the usual backward costs no pass over memory and no host sync to find that out."""
    g = tl.load(scale).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask).to(tl.float32)
        _store(X, offs, x * g, mask)
