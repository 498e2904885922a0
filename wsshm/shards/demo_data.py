"""The built-in demo data: procedural people with exact soft alphas, scenes, and two domains.

* **matte**: clean foregrounds (``fg.png``) and exact alphas, as matting datasets ship them.
* **background**: scenes without people, for the synthetic composites of training.
* **seg**: *natural* images with coarse binary masks (polygons as annotators draw them, no hair strands).
* **eval-synthetic**: held-out foregrounds pasted onto unrelated scenes (``I = a*F + (1-a)*B``, eq. 1).
* **eval-natural**: held-out people rendered *with* their scene, with the exact alpha.

What separates the domains is what separates real photos from composites: in a natural image the
subject shares the scene's light colour and direction, picks up its ambient colour at the edges, goes
through the same lens blur, sensor noise and JPEG compression; a synthetic composite pastes a sharp,
clean, studio-lit foreground onto a background that has its own cast, blur, noise and compression.
And most photos have something in front of the person (a pole, a branch, a railing, a counter),
which a composite never has: a teacher trained on composites fills the silhouette across it, the
fg/bg error of the paper's Figure 2c, while the segmentation masks of natural images leave it out.
(Without occluders a composite-trained teacher scored the same whole-image MSE on natural and
synthetic images, so the data showed no domain gap for MLB to close.)

Alphas are exact: silhouettes are drawn at 4x and area-averaged (anti-aliased edges), hair strands are
sub-pixel lines (semi-transparent), some subjects wear a translucent veil, and natural images blur the
alpha together with the foreground, so every image is ``a*F + (1-a)*B`` for its stored alpha (before
noise and compression, as with a real camera).
"""
from __future__ import annotations

import math
import multiprocessing
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from .layout import ShardFolderError, read_manifest
from .pairing import pair_folders
from .writer import convert

SS = 4  # supersampling factor for coverage (alpha) rendering
FULL = 65535  # full coverage on the 16-bit canvas
STRAND_T = np.linspace(0, 1, 8)
# The defaults of generate() and of ``wsshm-shard demo``: image height, samples per folder, seed.
DEFAULTS = dict(size=256, mattes=48, backgrounds=64, seg=160, eval_natural=20, eval_synthetic=20, seed=0)
GENERATOR_VERSION = 2  # part of each folder's recorded source: a folder from another version is redone
OCCLUDED = 0.7  # share of natural photos with something in front of the person
_STREAM = {"matte": 1, "background": 2, "seg": 3, "eval-natural": 4, "eval-synthetic": 5}


def _shape(size):
    return size, max(32, int(round(size * 0.75 / 8)) * 8)  # portrait, H x W


def _smooth_noise(rng, h, w, cells, channels=1):
    grid = rng.random((cells, max(2, int(cells * w / h)), channels)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, channels)


def _coverage(h, w, draw):
    """Anti-aliased coverage in [0, 1] of whatever ``draw(canvas, scale)`` paints at 4x."""
    canvas = np.zeros((h * SS, w * SS), np.uint16)  # 16 bits keep the area average exact enough
    draw(canvas, SS)
    return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 65535.0


def _pts(points, scale):
    return np.round(np.asarray(points, np.float64) * scale).astype(np.int32)


def subject(rng, h, w):
    """A person: (fg float HxWx3 in [0,1], alpha HxW exact, core HxW without strands/veil for masks)."""
    s = rng.uniform(0.85, 1.1)
    cx = w * rng.uniform(0.38, 0.62)
    head_r = 0.085 * h * s
    head_y = h * rng.uniform(0.24, 0.32)
    shoulder_y = head_y + 2.1 * head_r
    shoulder_w = head_r * rng.uniform(2.3, 2.9)
    tilt = rng.uniform(-8, 8)

    def body(canvas, k):
        torso = [(cx - shoulder_w, shoulder_y + 0.4 * head_r), (cx - 0.6 * shoulder_w, shoulder_y),
                 (cx + 0.6 * shoulder_w, shoulder_y), (cx + shoulder_w, shoulder_y + 0.4 * head_r),
                 (cx + shoulder_w * 1.15, h * 1.05), (cx - shoulder_w * 1.15, h * 1.05)]
        cv2.fillPoly(canvas, [_pts(torso, k)], FULL, cv2.LINE_AA)
        for side in (-1, 1):  # arms hanging from the shoulders
            a0 = (cx + side * shoulder_w * 0.95, shoulder_y + 0.5 * head_r)
            a1 = (a0[0] + side * rng.uniform(0.1, 0.5) * head_r, h * 1.05)
            cv2.line(canvas, tuple(_pts(a0, k)), tuple(_pts(a1, k)), FULL, int(0.9 * head_r * k), cv2.LINE_AA)

    def skin(canvas, k):
        cv2.ellipse(canvas, tuple(_pts((cx, head_y), k)), tuple(_pts((head_r * 0.82, head_r), k)), tilt, 0, 360,
                    FULL, -1, cv2.LINE_AA)
        neck = [(cx - 0.35 * head_r, head_y + 0.6 * head_r), (cx + 0.35 * head_r, head_y + 0.6 * head_r),
                (cx + 0.45 * head_r, shoulder_y + 0.2 * head_r), (cx - 0.45 * head_r, shoulder_y + 0.2 * head_r)]
        cv2.fillPoly(canvas, [_pts(neck, k)], FULL, cv2.LINE_AA)

    long_hair = rng.random() < 0.5
    hair_len = head_r * (rng.uniform(1.6, 2.6) if long_hair else rng.uniform(0.2, 0.6))

    def hair(canvas, k):
        cv2.ellipse(canvas, tuple(_pts((cx, head_y - 0.12 * head_r), k)),
                    tuple(_pts((head_r * 0.95, head_r * 1.08), k)), tilt, 180, 360, FULL, -1, cv2.LINE_AA)

    def hair_back(canvas, k):
        if long_hair:  # a fall of hair down to the shoulders, behind the face
            fall = [(cx - 0.95 * head_r, head_y - 0.1 * head_r), (cx + 0.95 * head_r, head_y - 0.1 * head_r),
                    (cx + 1.05 * head_r, head_y + hair_len), (cx - 1.05 * head_r, head_y + hair_len)]
            cv2.fillPoly(canvas, [_pts(fall, k)], FULL, cv2.LINE_AA)

    n_strands = int(rng.integers(60, 160))

    def strands(canvas, k):
        for _ in range(n_strands):
            theta = rng.uniform(math.pi * 0.95, math.pi * 2.05) if not long_hair else rng.uniform(math.pi * 0.6,
                                                                                               math.pi * 2.4)
            rx, ry = head_r * 0.95, head_r * 1.08
            x0, y0 = cx + rx * math.cos(theta), head_y - 0.12 * head_r + ry * math.sin(theta)
            if long_hair and math.sin(theta) > 0.3:
                y0 = head_y + rng.uniform(0, hair_len)
                x0 = cx + math.copysign(1.0 * head_r, math.cos(theta))
            length = head_r * rng.uniform(0.25, 0.9)
            direction = theta + rng.normal(0, 0.35)
            bend = rng.normal(0, 0.5)
            t = STRAND_T
            ang = direction + bend * t
            points = np.stack([x0 + length * t * np.cos(ang), y0 + length * t * np.sin(ang) + 0.3 * length * t * t], 1)
            # 1-2 px at 4x: a quarter to half a pixel wide at 1x, so strands are semi-transparent.
            cv2.polylines(canvas, [_pts(points, k)], False, FULL, int(rng.integers(1, 3)), cv2.LINE_AA)

    veil = rng.random() < 0.35
    veil_opacity = rng.uniform(0.3, 0.65)

    def veil_shape(canvas, k):
        side = rng.choice([-1, 1])
        poly = [(cx + side * 0.2 * shoulder_w, shoulder_y - 0.1 * head_r),
                (cx + side * 1.45 * shoulder_w, shoulder_y + 0.3 * head_r),
                (cx + side * 1.35 * shoulder_w, shoulder_y + 3.5 * head_r),
                (cx + side * 0.5 * shoulder_w, shoulder_y + 2.0 * head_r)]
        cv2.fillPoly(canvas, [_pts(poly, k)], FULL, cv2.LINE_AA)

    cloth_cov = _coverage(h, w, body)
    skin_cov = _coverage(h, w, skin)
    hair_cov = _coverage(h, w, hair)
    back_cov = _coverage(h, w, hair_back)
    strand_cov = _coverage(h, w, strands)
    veil_cov = _coverage(h, w, veil_shape) * veil_opacity if veil else np.zeros((h, w), np.float32)
    veil_cov = cv2.GaussianBlur(veil_cov, (0, 0), 0.8)  # a soft, see-through fabric edge

    cloth = _clothing(rng, h, w)
    skin_rgb = np.array(rng.choice([(0.93, 0.76, 0.64), (0.82, 0.6, 0.46), (0.6, 0.42, 0.3), (0.4, 0.27, 0.2)]))
    skin_rgb = (skin_rgb * rng.uniform(0.9, 1.1)).astype(np.float32)
    face = np.broadcast_to(skin_rgb, (h, w, 3)).copy()
    for ex in (-0.32, 0.32):  # eyes and a mouth, so heads read as faces
        cv2.circle(face, (int(cx + ex * head_r), int(head_y - 0.05 * head_r)), max(1, int(0.09 * head_r)),
                   (0.12, 0.08, 0.06), -1, cv2.LINE_AA)
    cv2.ellipse(face, (int(cx), int(head_y + 0.45 * head_r)), (max(1, int(0.25 * head_r)), max(1, int(0.06 * head_r))),
                0, 0, 360, (0.55, 0.25, 0.25), -1, cv2.LINE_AA)
    hair_rgb = np.array(rng.choice([(0.08, 0.06, 0.05), (0.3, 0.18, 0.1), (0.6, 0.45, 0.25), (0.85, 0.75, 0.5),
                                    (0.45, 0.12, 0.06)]))
    hair_tex = hair_rgb.astype(np.float32) * (0.8 + 0.4 * _smooth_noise(rng, h, w, 40))
    veil_rgb = rng.uniform(0.3, 1.0, 3).astype(np.float32)

    # Back-to-front "over" compositing of the layers, premultiplied, so fg and alpha agree exactly.
    premult = np.zeros((h, w, 3), np.float32)
    alpha = np.zeros((h, w), np.float32)
    for cov, colour in ((cloth_cov, cloth), (back_cov, hair_tex), (skin_cov, face), (hair_cov, hair_tex), (strand_cov, hair_tex),
                        (veil_cov, veil_rgb)):
        premult = premult * (1 - cov[..., None]) + cov[..., None] * colour
        alpha = alpha * (1 - cov) + cov
    fg = np.where(alpha[..., None] > 1e-4, premult / np.maximum(alpha[..., None], 1e-4), hair_tex)
    core = 1 - (1 - cloth_cov) * (1 - back_cov) * (1 - skin_cov) * (1 - hair_cov)
    return np.clip(fg, 0, 1, dtype=np.float32), np.clip(alpha, 0, 1), core


def _clothing(rng, h, w):
    base = rng.uniform(0.1, 0.9, 3)
    other = rng.uniform(0.1, 0.9, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pattern = rng.integers(0, 3)
    if pattern == 0:  # stripes
        period = rng.uniform(6, 18)
        mix = (np.sin((xx * rng.uniform(-1, 1) + yy) / period * 2 * math.pi) > 0).astype(np.float32)
    elif pattern == 1:  # blotchy print
        mix = (_smooth_noise(rng, h, w, 12)[..., 0] > 0.55).astype(np.float32)
    else:  # plain, with fabric texture
        mix = np.zeros((h, w), np.float32)
    mix = cv2.GaussianBlur(mix, (0, 0), 0.7)[..., None]
    cloth = base.astype(np.float32) * (1 - mix) + other.astype(np.float32) * mix
    return cloth * (0.85 + 0.3 * _smooth_noise(rng, h, w, 60))


def scene(rng, h, w):
    """A background without people: sky, ground, buildings and foliage, float HxWx3 in [0, 1]."""
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    sky_top, sky_low = rng.uniform(0.3, 1.0, 3), rng.uniform(0.5, 1.0, 3)
    horizon = rng.uniform(0.35, 0.7)
    img = sky_top * (1 - yy) + sky_low * yy
    ground = rng.uniform(0.1, 0.7, 3)
    ground_img = ground * (0.7 + 0.6 * _smooth_noise(rng, h, w, 30))
    img = np.where(yy > horizon, ground_img, img).astype(np.float32)
    for _ in range(int(rng.integers(2, 7))):  # buildings with windows
        x0 = int(rng.uniform(-0.1, 0.9) * w)
        bw, bh = int(rng.uniform(0.15, 0.45) * w), int(rng.uniform(0.15, 0.55) * h)
        y1 = int(horizon * h + rng.uniform(0, 0.15) * h)
        colour = rng.uniform(0.2, 0.9, 3)
        cv2.rectangle(img, (x0, y1 - bh), (x0 + bw, y1), colour.tolist(), -1)
        step = int(rng.integers(8, 16))
        for wy in range(y1 - bh + 4, y1 - 6, step):
            for wx in range(x0 + 4, x0 + bw - 6, step):
                cv2.rectangle(img, (wx, wy), (wx + step // 3, wy + step // 2), (colour * 0.5).tolist(), -1)
    for _ in range(int(rng.integers(1, 6))):  # trees and bushes
        centre = (int(rng.uniform(0, 1) * w), int((horizon + rng.uniform(-0.1, 0.2)) * h))
        axes = (int(rng.uniform(0.06, 0.2) * w), int(rng.uniform(0.06, 0.2) * h))
        cv2.ellipse(img, centre, axes, 0, 0, 360, (rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.7),
                                                  rng.uniform(0.05, 0.3)), -1)
    img *= 0.8 + 0.4 * _smooth_noise(rng, h, w, 50)
    return np.clip(img, 0, 1)


def _light(rng, h, w):
    """A scene's illumination: colour cast times a directional falloff, HxWx3."""
    cast = np.array(rng.choice([(1.15, 1.0, 0.78), (0.8, 0.95, 1.2), (1.05, 1.05, 0.95), (1.1, 0.9, 1.05)]))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xx / w - 0.5) * math.cos(angle) + (yy / h - 0.5) * math.sin(angle))
    strength = rng.uniform(0.5, 1.1)
    return (cast * (rng.uniform(0.75, 1.05) + strength * ramp)[..., None]).astype(np.float32)


def _noise_and_jpeg(rng, img, sigma, quality):
    noisy = img + rng.normal(0, sigma, img.shape).astype(np.float32)
    return _jpeg(np.clip(noisy, 0, 1), quality)


def _jpeg(img, quality):
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(_u8(img), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes()


def _u8(img):
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def occluders(rng, h, w, alpha):
    """Things between the camera and the person (poles, branches, a railing, a counter): coverage
    HxW and colour HxWx3. A pasted composite never has them, which is one way a teacher trained on
    composites goes wrong on photos: it takes whatever crosses a silhouette for the person."""
    cols = np.flatnonzero(alpha.max(axis=0) > 0.5)
    rows = np.flatnonzero(alpha.max(axis=1) > 0.5)
    x0, x1 = (cols[0], cols[-1]) if cols.size else (0, w - 1)
    y0 = rows[0] if rows.size else 0
    shapes = [rng.choice(["pole", "branch", "railing", "counter"]) for _ in range(int(rng.integers(1, 3)))]

    def draw(canvas, k):
        for shape in shapes:
            if shape == "pole":
                x, half = rng.uniform(x0, x1), w * rng.uniform(0.04, 0.08)
                cv2.fillPoly(canvas, [_pts([(x - half, -1), (x + half, -1), (x + half, h + 1), (x - half, h + 1)], k)],
                             FULL, cv2.LINE_AA)
            elif shape == "branch":
                start = (rng.choice([-0.1, 1.1]) * w, rng.uniform(y0, h))
                end = (rng.uniform(x0, x1), rng.uniform(y0, h))
                cv2.line(canvas, tuple(_pts(start, k)), tuple(_pts(end, k)), FULL,
                         max(1, int(w * rng.uniform(0.05, 0.1) * k)), cv2.LINE_AA)
            elif shape == "railing":
                y, half = rng.uniform(0.55, 0.85) * h, h * rng.uniform(0.02, 0.04)
                cv2.fillPoly(canvas, [_pts([(-1, y - half), (w + 1, y - half), (w + 1, y + half), (-1, y + half)], k)],
                             FULL, cv2.LINE_AA)
            else:  # a counter or a car bonnet across the bottom of the picture
                y = rng.uniform(0.75, 0.92) * h
                cv2.fillPoly(canvas, [_pts([(-1, y), (w + 1, y + rng.uniform(-0.05, 0.05) * h), (w + 1, h + 1),
                                            (-1, h + 1)], k)], FULL, cv2.LINE_AA)

    coverage = _coverage(h, w, draw)
    colour = rng.uniform(0.1, 0.9, 3).astype(np.float32) * (0.75 + 0.5 * _smooth_noise(rng, h, w, 20))
    return coverage, colour


def natural(rng, h, w):
    """A person photographed in a scene: (jpeg bytes, exact alpha HxW, coarse binary mask)."""
    fg, alpha, core = subject(rng, h, w)
    bg = scene(rng, h, w)
    light = _light(rng, h, w)
    ambient = cv2.GaussianBlur(bg, (0, 0), 12) * light
    bg = cv2.GaussianBlur(bg * light, (0, 0), rng.uniform(0.6, 2.2))  # subject in focus, background not
    # The subject shares the scene's light, and its rim picks up the scene's colour.
    rim = np.clip(1.0 - cv2.GaussianBlur(alpha, (0, 0), 2.0), 0, 1)[..., None]
    fg = fg * light * (1 - 0.35 * rim) + ambient * 0.35 * rim
    # Most photos have something in front of the person; what it covers is not the person.
    occ, occ_rgb = occluders(rng, h, w, alpha) if rng.random() < OCCLUDED else (np.zeros_like(alpha), fg)
    alpha, core = alpha * (1 - occ), core * (1 - occ)
    # One lens blur for every layer (premultiplied), so I = a*F + (1-a)*B stays exact: the person and
    # the occluder cover disjoint parts of each pixel, and B is what is left (scene and occluder).
    sigma = rng.uniform(0.35, 0.9)
    alpha_b = cv2.GaussianBlur(alpha, (0, 0), sigma)
    occ_b = cv2.GaussianBlur(occ, (0, 0), sigma)
    premult = cv2.GaussianBlur(fg * alpha[..., None], (0, 0), sigma)
    premult += cv2.GaussianBlur(occ_rgb * light * occ[..., None], (0, 0), sigma)
    image = premult + np.clip(1 - alpha_b - occ_b, 0, 1)[..., None] * bg
    vignette = 1 - 0.25 * _radius(h, w) ** 2
    image = image * vignette[..., None]
    data = _noise_and_jpeg(rng, image, rng.uniform(0.01, 0.03), int(rng.integers(55, 86)))
    mask = _annotator_mask(cv2.GaussianBlur(core, (0, 0), sigma))
    return data, alpha_b, mask


def _radius(h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.sqrt(((xx / w - 0.5) * 2) ** 2 + ((yy / h - 0.5) * 2) ** 2) / math.sqrt(2)


def _annotator_mask(core):
    """A person mask as people draw it: a polygon around the body, no strands, 0/255."""
    binary = (core > 0.5).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    mask = np.zeros_like(binary)
    polys = [cv2.approxPolyDP(c, 1.5, True) for c in contours]
    cv2.fillPoly(mask, polys, 255)
    return mask


def synthetic(rng, h, w, fg=None, alpha=None):
    """A pasted composite: studio-lit sharp fg over an unrelated scene with its own look (png bytes, alpha)."""
    if fg is None:
        fg, alpha, _ = subject(rng, h, w)
    studio = rng.uniform(0.95, 1.15)  # neutral, bright, no cast
    bg = scene(rng, h, w) * _light(rng, h, w)
    bg = cv2.GaussianBlur(bg, (0, 0), rng.uniform(0.1, 2.5))
    bg = cv2.cvtColor(cv2.imdecode(np.frombuffer(_noise_and_jpeg(rng, bg, rng.uniform(0.0, 0.03),
                                                                 int(rng.integers(60, 95))), np.uint8),
                                   cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    image = alpha[..., None] * np.clip(fg * studio, 0, 1) + (1 - alpha[..., None]) * bg
    return _png(image), alpha


def _png(img):
    ok, buf = cv2.imencode(".png", cv2.cvtColor(_u8(img), cv2.COLOR_RGB2BGR) if img.ndim == 3 else _u8(img),
                           [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return buf.tobytes()


def _write(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _render_one(job):
    src, kind, i, size, seed = job
    h, w = _shape(size)
    rng = np.random.default_rng([seed, _STREAM[kind], i])  # one stream per sample: any order, same bytes
    name = f"{kind.replace('-', '_')}_{i:05d}"
    if kind == "matte":
        fg, alpha, _ = subject(rng, h, w)
        _write(src / kind / "fg" / f"{name}.png", _png(fg))
        _write(src / kind / "alpha" / f"{name}.png", _png(alpha))
    elif kind == "background":
        _write(src / kind / "images" / f"{name}.jpg", _jpeg(scene(rng, h, w) * _light(rng, h, w), 90))
    elif kind == "seg":
        data, _, mask = natural(rng, h, w)
        _write(src / kind / "images" / f"{name}.jpg", data)
        _write(src / kind / "labels" / f"{name}.png", _png(mask.astype(np.float32) / 255))
    elif kind == "eval-natural":
        data, alpha, _ = natural(rng, h, w)
        _write(src / kind / "images" / f"{name}.jpg", data)
        _write(src / kind / "labels" / f"{name}.png", _png(alpha))
    else:
        data, alpha = synthetic(rng, h, w)
        _write(src / kind / "images" / f"{name}.png", data)
        _write(src / kind / "labels" / f"{name}.png", _png(alpha))


def _render(src: Path, kind: str, count: int, size: int, seed: int, workers: int, progress: bool):
    jobs = [(src, kind, i, size, seed) for i in range(count)]
    bar = tqdm(total=count, desc=f"rendering {kind}", unit="img", disable=not progress, file=sys.stderr)
    with bar:
        if workers <= 1:
            for job in jobs:
                _render_one(job)
                bar.update()
            return
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        with multiprocessing.get_context(method).Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_one, jobs):
                bar.update()


def generate(out_dir, *, size=DEFAULTS["size"], mattes=DEFAULTS["mattes"], backgrounds=DEFAULTS["backgrounds"],
             seg=DEFAULTS["seg"], eval_natural=DEFAULTS["eval_natural"], eval_synthetic=DEFAULTS["eval_synthetic"],
             seed=DEFAULTS["seed"], workers=1, progress=False) -> dict:
    """Write the five demo shard folders under ``out_dir``; returns ``{folder name: path}``.

    Images are ``size`` pixels high and ``0.75 * size`` wide (portrait); the counts are per folder
    (``DEFAULTS`` holds the defaults). The same arguments always give the same bytes; a finished
    folder is left as it is when called again.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"matte": mattes, "background": backgrounds, "seg": seg, "eval-natural": eval_natural,
              "eval-synthetic": eval_synthetic}
    folders = {}
    with tempfile.TemporaryDirectory(prefix=".demo-src-", dir=out) as tmp:
        src = Path(tmp)
        for kind, count in counts.items():
            folders[kind] = str(out / kind)
            source = {"generator": "wsshm.shards.demo_data", "version": GENERATOR_VERSION, "domain": kind, "size": size,
                      "count": count, "seed": seed}
            try:
                if read_manifest(out / kind).get("source") == source:
                    continue  # already generated with these settings
            except ShardFolderError:
                pass
            _render(src, kind, count, size, seed, workers, progress)
            shard_kind = {"eval-natural": "eval", "eval-synthetic": "eval"}.get(kind, kind)
            root = src / kind
            if kind == "matte":
                scan = pair_folders(root / "fg", {"alpha": root / "alpha"})
            elif kind == "background":
                scan = pair_folders(root / "images", {})
            else:
                scan = pair_folders(root / "images", {"mask" if kind == "seg" else "alpha": root / "labels"})
            if scan.errors:
                raise RuntimeError(f"demo generator produced unpairable files: {scan.errors[:3]}")
            convert(shard_kind, scan, out / kind, name=kind, source=source, maxcount=max(1, math.ceil(count / 4)),
                    workers=workers, progress=progress, overwrite=True)
    return folders


__all__ = ["DEFAULTS", "generate", "natural", "scene", "subject", "synthetic"]
