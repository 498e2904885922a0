"""SPEC section 4 metrics: known answers, and Grad/Conn against a loop-style transcription of the
Deep Image Matting MATLAB evaluation code (gaussgradient.m, compute_gradient_loss.m,
compute_connectivity_error.m), kept deliberately naive and separate from wsshm.metrics."""
import math
from collections import deque

import numpy as np
import pytest

from wsshm.metrics import MetricMeter, connectivity_error, evaluate_pair, gradient_error


# ---- transcription of the MATLAB code (1-based loops turned 0-based, nothing vectorised) ----------

def matlab_gauss(x, sigma):
    return math.exp(-x * x / (2 * sigma * sigma)) / (sigma * math.sqrt(2 * math.pi))


def matlab_dgauss(x, sigma):
    return -x * matlab_gauss(x, sigma) / (sigma * sigma)


def matlab_gaussgradient(im, sigma):
    epsilon = 1e-2
    halfsize = math.ceil(sigma * math.sqrt(-2 * math.log(math.sqrt(2 * math.pi) * sigma * epsilon)))
    size = 2 * halfsize + 1
    hx = [[matlab_gauss(i - halfsize, sigma) * matlab_dgauss(j - halfsize, sigma) for j in range(size)]
          for i in range(size)]
    norm = math.sqrt(sum(v * v for row in hx for v in row))
    hx = [[v / norm for v in row] for row in hx]
    hy = [[hx[j][i] for j in range(size)] for i in range(size)]
    rows, cols = len(im), len(im[0])

    def imfilter_replicate_conv(h):
        out = [[0.0] * cols for _ in range(rows)]
        for r in range(rows):
            for c in range(cols):
                acc = 0.0
                for i in range(size):
                    for j in range(size):
                        rr = min(max(r - (i - halfsize), 0), rows - 1)
                        cc = min(max(c - (j - halfsize), 0), cols - 1)
                        acc += h[i][j] * im[rr][cc]
                out[r][c] = acc
        return out

    return imfilter_replicate_conv(hx), imfilter_replicate_conv(hy)


def matlab_mat2gray(a):
    lo = min(min(row) for row in a)
    hi = max(max(row) for row in a)
    if hi == lo:
        return [list(row) for row in a]
    return [[(v - lo) / (hi - lo) for v in row] for row in a]


def matlab_gradient_loss(pred, target, sigma=1.4):
    pred, target = matlab_mat2gray(pred), matlab_mat2gray(target)
    px, py = matlab_gaussgradient(pred, sigma)
    tx, ty = matlab_gaussgradient(target, sigma)
    loss = 0.0
    for r in range(len(pred)):
        for c in range(len(pred[0])):
            pa = math.sqrt(px[r][c] ** 2 + py[r][c] ** 2)
            ta = math.sqrt(tx[r][c] ** 2 + ty[r][c] ** 2)
            loss += (pa - ta) ** 2
    return loss


def matlab_bwconncomp4(mask):
    """Components as lists of pixels, numbered in MATLAB's column-major scan order."""
    rows, cols = len(mask), len(mask[0])
    seen = [[False] * cols for _ in range(rows)]
    components = []
    for c in range(cols):
        for r in range(rows):
            if mask[r][c] and not seen[r][c]:
                pixels, queue = [], deque([(r, c)])
                seen[r][c] = True
                while queue:
                    y, x = queue.popleft()
                    pixels.append((y, x))
                    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < rows and 0 <= nx < cols and mask[ny][nx] and not seen[ny][nx]:
                            seen[ny][nx] = True
                            queue.append((ny, nx))
                components.append(pixels)
    return components


def matlab_connectivity_error(pred, target, step=0.1):
    rows, cols = len(pred), len(pred[0])
    n = round(1 / step)
    thresh_steps = [k / n for k in range(n + 1)]
    l_map = [[-1.0] * cols for _ in range(rows)]
    for ii in range(1, len(thresh_steps)):
        t = thresh_steps[ii]
        both = [[pred[r][c] >= t and target[r][c] >= t for c in range(cols)] for r in range(rows)]
        components = matlab_bwconncomp4(both)
        omega = [[0] * cols for _ in range(rows)]
        if components:
            sizes = [len(p) for p in components]
            max_id = sizes.index(max(sizes))  # MATLAB's max: first of the largest
            for y, x in components[max_id]:
                omega[y][x] = 1
        for r in range(rows):
            for c in range(cols):
                if l_map[r][c] == -1 and omega[r][c] == 0:
                    l_map[r][c] = thresh_steps[ii - 1]
    loss = 0.0
    for r in range(rows):
        for c in range(cols):
            lv = 1.0 if l_map[r][c] == -1 else l_map[r][c]
            pd, td = pred[r][c] - lv, target[r][c] - lv
            pphi = 1 - pd * (1.0 if pd >= 0.15 else 0.0)
            tphi = 1 - td * (1.0 if td >= 0.15 else 0.0)
            loss += abs(pphi - tphi)
    return loss


# ---- agreement with the transcription -----------------------------------------------------------

def _random_pair(rng, h, w, levels):
    """Random mattes; few grey levels make equal-size component ties and exact thresholds likely."""
    pred = rng.integers(0, levels + 1, size=(h, w)) / levels
    gt = rng.integers(0, levels + 1, size=(h, w)) / levels
    return pred, gt


@pytest.mark.parametrize("seed,h,w,levels", [(0, 7, 11, 255), (1, 12, 9, 4), (2, 16, 16, 2), (3, 5, 3, 10)])
def test_grad_matches_matlab_transcription(seed, h, w, levels):
    pred, gt = _random_pair(np.random.default_rng(seed), h, w, levels)
    expected = matlab_gradient_loss(pred.tolist(), gt.tolist()) / 1e3
    assert gradient_error(pred, gt) == pytest.approx(expected, rel=1e-10, abs=1e-15)
    assert evaluate_pair(pred, gt)["grad"] == pytest.approx(expected, rel=1e-10, abs=1e-15)


@pytest.mark.parametrize("seed,h,w,levels", [(0, 7, 11, 255), (1, 12, 9, 4), (2, 16, 16, 2),
                                             (3, 5, 3, 10), (4, 20, 14, 3), (5, 9, 9, 1)])
def test_conn_matches_matlab_transcription(seed, h, w, levels):
    pred, gt = _random_pair(np.random.default_rng(seed), h, w, levels)
    expected = matlab_connectivity_error(pred.tolist(), gt.tolist()) / 1e3
    assert connectivity_error(pred, gt) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert expected > 0


def test_conn_tie_goes_to_first_component_in_column_major_order():
    # Two 2-pixel components: A (top right, first in row-major order) and B (bottom left, first in
    # MATLAB's column-major order). MATLAB keeps B; keeping A would give a different error.
    gt = np.array([[0, 0, 1.0], [0, 0, 1.0], [1.0, 1.0, 0]])
    pred = gt.copy()
    pred[2, 0] = 0.25
    expected = matlab_connectivity_error(pred.tolist(), gt.tolist()) / 1e3
    assert connectivity_error(pred, gt) == pytest.approx(expected, rel=1e-12)
    # by hand: B kept at 0.1 and 0.2 (A's pixels get level 0, where d = 1 for both maps: no error);
    # at 0.3 (2, 0) drops out, A (2 pixels) wins, B's pixels get level 0.2: pred d = 0.05 < 0.15 ->
    # phi 1, gt d = 0.8 -> phi 0.2. Keeping A at 0.1 instead would give B level 0 and 0.75.
    assert expected == pytest.approx(0.8 / 1e3)


# ---- known answers ------------------------------------------------------------------------------

def test_whole_and_boundary_errors_by_hand():
    gt = np.array([[0.0, 0.5], [1.0, 0.25]])
    pred = np.array([[0.0, 0.0], [1.0, 1.0]])
    m = evaluate_pair(pred, gt)
    assert m["mse"] == pytest.approx((0.25 + 0.5625) / 4 * 1e3)
    assert m["sad"] == pytest.approx(1.25 / 1e3)
    assert m["mad"] == pytest.approx(1.25 / 4 * 1e3)
    assert m["mse_boundary"] == pytest.approx((0.25 + 0.5625) / 2 * 1e3)
    assert m["sad_boundary"] == pytest.approx(1.25 / 1e3)
    assert set(m) == {"mse", "sad", "mse_boundary", "sad_boundary", "mad", "grad", "conn"}


def test_boundary_region_is_strict():
    gt = np.array([[0.05, 0.95, 0.0500001, 0.5]])
    pred = np.zeros_like(gt)
    m = evaluate_pair(pred, gt)
    assert m["sad_boundary"] == pytest.approx((0.0500001 + 0.5) / 1e3)
    assert m["mse_boundary"] == pytest.approx((0.0500001**2 + 0.25) / 2 * 1e3)


def test_empty_boundary_is_nan_and_counted():
    gt = np.array([[0.0, 1.0], [0.95, 0.05]])
    pred = np.full_like(gt, 0.5)
    empty = evaluate_pair(pred, gt)
    assert math.isnan(empty["mse_boundary"]) and empty["sad_boundary"] == 0.0
    other = evaluate_pair(np.array([[0.0, 0.0]]), np.array([[0.5, 1.0]]))
    meter = MetricMeter()
    meter.update(empty)
    meter.update(other)
    means = meter.compute()
    assert meter.count == 2 and meter.skipped_boundary == 1
    assert means["mse_boundary"] == pytest.approx(250.0)  # only `other`: 0.25 / 1 * 1e3
    assert means["mse"] == pytest.approx((empty["mse"] + other["mse"]) / 2)
    assert means["sad_boundary"] == pytest.approx(0.5 / 1e3 / 2)


def test_perfect_prediction_scores_zero():
    gt = np.random.default_rng(0).random((20, 30))
    m = evaluate_pair(gt.copy(), gt)
    assert m["mse"] == m["sad"] == m["mad"] == m["grad"] == m["conn"] == 0.0
    assert m["mse_boundary"] == 0.0


def test_grad_ignores_affine_rescaling():
    # both maps are min-max normalised first (mat2gray), so an affine copy has the same gradients
    gt = np.random.default_rng(1).random((16, 16))
    assert gradient_error(0.2 + 0.5 * gt, gt) == pytest.approx(0.0, abs=1e-15)


def test_grad_of_a_step_edge_by_hand():
    # gt: a vertical 0 -> 1 step; pred: constant (zero gradient). Far from the left and right borders
    # gy = 0 and gx at column offset m from the step is (sum of gauss) * (cumulative sum of the
    # derivative taps up to m) / ||hx||; the 9x9 kernel (sigma 1.4 -> half size 4) ends it at |m| > 4.
    sigma, half, rows = 1.4, 4, 6
    g = [math.exp(-u * u / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi)) for u in range(-half, half + 1)]
    d = [-u * g[u + half] / sigma**2 for u in range(-half, half + 1)]
    norm = math.sqrt(sum(a * a for a in g) * sum(b * b for b in d))
    per_row = sum((sum(g) * sum(d[: k + 1]) / norm) ** 2 for k in range(2 * half + 1))
    gt = np.zeros((rows, 30))
    gt[:, 15:] = 1.0
    pred = np.full_like(gt, 0.3)
    assert gradient_error(pred, gt) == pytest.approx(rows * per_row / 1e3, rel=1e-12)
    assert gradient_error(pred.T, gt.T) == pytest.approx(rows * per_row / 1e3, rel=1e-12)


def test_conn_by_hand():
    # nothing above any threshold in common: every level is 0; gt's phi is 0, pred's is 1
    assert connectivity_error(np.zeros((2, 2)), np.ones((2, 2))) == pytest.approx(4 / 1e3)
    # one pixel at 0.5 in an all-ones gt leaves the common component at 0.6: level 0.5 there,
    # pred d = 0 (phi 1), gt d = 0.5 (phi 0.5)
    pred = np.ones((3, 3))
    pred[1, 1] = 0.5
    assert connectivity_error(pred, np.ones((3, 3))) == pytest.approx(0.5 / 1e3)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="differ in size"):
        evaluate_pair(np.zeros((4, 5)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="H x W"):
        evaluate_pair(np.zeros((4, 5, 1)), np.zeros((4, 5, 1)))


@pytest.mark.parametrize("pred, gt, message", [
    # 0..255 mattes would score 65,025x too high: refused, not converted
    (np.zeros((4, 5), np.uint8), np.zeros((4, 5)), r"pred: expected a float matte in \[0, 1\], got uint8"),
    (np.zeros((4, 5)), np.full((4, 5), 255, np.uint8), r"gt: expected a float matte in \[0, 1\], got uint8"),
    (np.zeros((4, 5)), np.zeros((4, 5), bool), r"gt: expected a float matte in \[0, 1\], got bool"),
    (np.full((4, 5), 255.0), np.zeros((4, 5)), r"pred: values outside \[0, 1\] \(255 to 255\)"),
    (np.zeros((4, 5)), np.full((4, 5), -0.5), r"gt: values outside \[0, 1\] \(-0.5 to -0.5\)"),
    (np.array([[0.5, np.nan]]), np.zeros((1, 2)), "pred: 1 value is not finite"),
    (np.zeros((1, 2)), np.array([[np.inf, np.nan]]), "gt: 2 values are not finite"),
    (np.zeros((0, 0)), np.zeros((0, 0)), r"pred: an empty 0x0 matte"),
    (np.zeros((3, 0)), np.zeros((3, 0)), r"pred: an empty 0x3 matte"),
])
def test_bad_mattes_are_one_clear_error_naming_the_argument(pred, gt, message):
    for metric in (evaluate_pair, gradient_error, connectivity_error):
        with pytest.raises(ValueError, match=message) as error:
            metric(pred, gt)
        assert "\n" not in str(error.value)


def test_float32_and_float16_mattes_are_scored_like_float64():
    gt = np.array([[0.0, 0.5], [1.0, 0.25]])
    pred = np.array([[0.0, 0.0], [1.0, 1.0]])
    expected = evaluate_pair(pred, gt)
    for dtype in (np.float32, np.float16):
        got = evaluate_pair(pred.astype(dtype), gt.astype(dtype))
        assert got["mse"] == pytest.approx(expected["mse"]) and got["sad"] == pytest.approx(expected["sad"])
