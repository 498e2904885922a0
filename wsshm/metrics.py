"""Matting metrics of SPEC section 4, per image at the ground truth's resolution.

``evaluate_pair(pred, gt)`` scores one image; ``MetricMeter`` averages the scores over a set.
Grad and Conn follow the Deep Image Matting evaluation code (Xu et al. 2017, the MATLAB files
``compute_gradient_loss.m``, ``gaussgradient.m`` and ``compute_connectivity_error.m``) on the whole
image instead of a trimap's unknown region, divided by 1e3 like SAD.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from wsshm.losses import BOUNDARY_HIGH, BOUNDARY_LOW

GRAD_SIGMA = 1.4
CONN_STEP = 0.1
CONN_THETA = 0.15
METRIC_KEYS = ("mse", "sad", "mse_boundary", "sad_boundary", "mad", "grad", "conn")


def _check_matte(name: str, matte) -> np.ndarray:
    """``matte`` as float64, or a ``ValueError`` naming the argument: integer mattes (0..255 would score
    65,025x too high, so they are refused rather than guessed at), values outside [0, 1], NaN/inf,
    and empty arrays."""
    matte = np.asarray(matte)
    if not np.issubdtype(matte.dtype, np.floating):
        raise ValueError(f"{name}: expected a float matte in [0, 1], got {matte.dtype} "
                         "(divide 8-bit mattes by 255 first)")
    if matte.ndim == 2 and matte.size == 0:
        raise ValueError(f"{name}: an empty {matte.shape[1]}x{matte.shape[0]} matte")
    matte = matte.astype(np.float64)
    bad = int(np.count_nonzero(~np.isfinite(matte)))
    if bad:
        raise ValueError(f"{name}: {bad} value{' is' if bad == 1 else 's are'} not finite (NaN or inf)")
    if matte.size and (matte.min() < 0.0 or matte.max() > 1.0):
        raise ValueError(f"{name}: values outside [0, 1] ({matte.min():g} to {matte.max():g})")
    return matte


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = _check_matte("pred", pred), _check_matte("gt", gt)
    if pred.ndim != 2 or gt.ndim != 2:
        raise ValueError(f"metrics expect H x W mattes, got pred {pred.shape} and gt {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ in size; resize the prediction "
                         "to the ground truth first (wsshm.inference.predict_matte does)")
    return pred, gt


def gauss_derivative_kernels(sigma: float = GRAD_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """The separable factors of ``gaussgradient.m``'s x-kernel: ``hx[i, j] = gauss(i) * dgauss(j)``.

    Returns ``(along_rows, along_cols)``, already scaled so that their outer product has unit
    Frobenius norm, as the MATLAB code normalises ``hx``. The y-kernel is the transpose.
    """
    epsilon = 1e-2
    half = math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * epsilon)))
    u = np.arange(-half, half + 1, dtype=np.float64)
    gauss = np.exp(-u**2 / (2.0 * sigma**2)) / (sigma * math.sqrt(2.0 * math.pi))
    dgauss = -u * gauss / sigma**2
    norm = math.sqrt(float(np.sum(gauss**2)) * float(np.sum(dgauss**2)))
    return gauss, dgauss / norm


def _mat2gray(x: np.ndarray) -> np.ndarray:
    """MATLAB ``mat2gray``: scale to [0, 1] by min and max; a constant map keeps its values
    (its gradient is zero either way)."""
    lo, hi = float(x.min()), float(x.max())
    return x if hi == lo else (x - lo) / (hi - lo)


def _gradient_magnitude(x: np.ndarray, sigma: float) -> np.ndarray:
    smooth, deriv = gauss_derivative_kernels(sigma)
    # imfilter(..., 'replicate', 'conv') == ndimage.convolve1d(mode="nearest"), and the 2-D kernel
    # is separable, so two 1-D passes per direction give the same numbers.
    gx = ndimage.convolve1d(ndimage.convolve1d(x, smooth, axis=0, mode="nearest"), deriv, axis=1, mode="nearest")
    gy = ndimage.convolve1d(ndimage.convolve1d(x, deriv, axis=0, mode="nearest"), smooth, axis=1, mode="nearest")
    return np.sqrt(gx**2 + gy**2)


def gradient_error(pred: np.ndarray, gt: np.ndarray, sigma: float = GRAD_SIGMA) -> float:
    """Deep Image Matting's Grad on the whole image, ``/ 1e3``."""
    pred, gt = _check_pair(pred, gt)
    diff = _gradient_magnitude(_mat2gray(pred), sigma) - _gradient_magnitude(_mat2gray(gt), sigma)
    return float(np.sum(diff**2)) / 1e3


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component; ties go to the one MATLAB's ``bwconncomp`` lists first,
    which numbers components in column-major scan order (hence the transpose)."""
    labels, count = ndimage.label(mask.T)
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())[1:]
    return (labels == int(np.argmax(sizes)) + 1).T


def connectivity_error(pred: np.ndarray, gt: np.ndarray, step: float = CONN_STEP,
                       theta: float = CONN_THETA) -> float:
    """Deep Image Matting's Conn on the whole image, ``/ 1e3``.

    Thresholds are ``k * step`` computed as ``k / n`` (0.3 is the double nearest 0.3, not
    ``3 * 0.1``), for k = 1..n.
    """
    pred, gt = _check_pair(pred, gt)
    n = int(round(1.0 / step))
    thresholds = np.arange(n + 1) / n
    level = np.full(pred.shape, -1.0)
    for previous, threshold in zip(thresholds[:-1], thresholds[1:]):
        omega = _largest_component((pred >= threshold) & (gt >= threshold))
        level[(level == -1) & ~omega] = previous
    level[level == -1] = 1.0
    pred_d, gt_d = pred - level, gt - level
    pred_phi = 1.0 - pred_d * (pred_d >= theta)
    gt_phi = 1.0 - gt_d * (gt_d >= theta)
    return float(np.sum(np.abs(pred_phi - gt_phi))) / 1e3


def evaluate_pair(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """All SPEC section 4 metrics of one image, already scaled as in the paper's tables.

    ``mse_boundary`` is NaN when the boundary region ``0.05 < gt < 0.95`` is empty; ``sad_boundary``
    is then 0.
    """
    pred, gt = _check_pair(pred, gt)
    diff = pred - gt
    region = (gt > BOUNDARY_LOW) & (gt < BOUNDARY_HIGH)
    n_region = int(region.sum())
    return {
        "mse": float(np.mean(diff**2)) * 1e3,
        "sad": float(np.sum(np.abs(diff))) / 1e3,
        "mse_boundary": float(np.sum(diff[region] ** 2)) / n_region * 1e3 if n_region else math.nan,
        "sad_boundary": float(np.sum(np.abs(diff[region]))) / 1e3,
        "mad": float(np.mean(np.abs(diff))) * 1e3,
        "grad": gradient_error(pred, gt),
        "conn": connectivity_error(pred, gt),
    }


class MetricMeter:
    """Means of ``evaluate_pair`` dicts over images; a NaN value (an empty boundary region) is left
    out of its key's mean and counted in ``skipped[key]``."""

    def __init__(self) -> None:
        self.count = 0
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self.skipped: dict[str, int] = {}

    def update(self, metrics: dict[str, float]) -> None:
        self.count += 1
        for key, value in metrics.items():
            self._sums.setdefault(key, 0.0)
            self._counts.setdefault(key, 0)
            self.skipped.setdefault(key, 0)
            if math.isnan(value):
                self.skipped[key] += 1
            else:
                self._sums[key] += float(value)
                self._counts[key] += 1

    def compute(self) -> dict[str, float]:
        """Mean per key (NaN for a key no image could score)."""
        return {key: self._sums[key] / self._counts[key] if self._counts[key] else math.nan
                for key in self._sums}

    @property
    def skipped_boundary(self) -> int:
        """Images left out of ``mse_boundary`` because their boundary region was empty."""
        return self.skipped.get("mse_boundary", 0)
