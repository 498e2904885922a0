"""Checking input images and turning them into shard members.

Valid 8-bit RGB JPEG/PNG bytes (and 8-bit grey PNG labels) are stored exactly as read. Anything else
(webp, bmp, tiff, 16-bit PNG, palette or RGBA images, CMYK JPEG, EXIF-rotated JPEG, RGB alphas) is
decoded and re-encoded once as PNG, and the reason is returned so the manifest can count it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 80_000_000

# Pillow's own bomb check would raise before ours names the limit; ours is the one that counts.
Image.MAX_IMAGE_PIXELS = None


class BadInput(Exception):
    """An input file that cannot become part of a sample; the message is the reason in errors.jsonl."""


@dataclass
class Member:
    ext: str  # "jpg" or "png"
    data: bytes
    width: int
    height: int
    normalised: str | None  # why it was re-encoded, None when stored as read


def _png_header(data: bytes):
    """(bit depth, colour type) from a PNG's IHDR chunk."""
    if len(data) < 29 or data[12:16] != b"IHDR":
        return None, None
    return data[24], data[25]


def _encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _open(path: str, max_pixels: int):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BadInput(f"unreadable file ({exc.strerror or exc})") from exc
    if not data:
        raise BadInput("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise BadInput("not an image (no decoder recognises its bytes)") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file, named in the report
        raise BadInput(f"truncated or corrupt image header ({exc})") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise BadInput(f"decompression bomb: {width}x{height} = {width * height} pixels is over the limit of "
                       f"{max_pixels} (--max-pixels)")
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001
        raise BadInput(f"truncated or corrupt image data ({exc})") from exc
    return data, image


def _orientation(image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is treated as no rotation
        return 1


def _to_rgb(image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.round(grey / (257.0 if grey.max() > 255 else 1.0)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA").convert("RGB")  # drop transparency, keep the colours
    return np.asarray(image.convert("RGB"))


def load_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Member:
    """An RGB image member: the file's bytes when they are 8-bit RGB JPEG/PNG, else one PNG re-encode."""
    data, image = _open(path, max_pixels)
    fmt = image.format
    if fmt == "JPEG" and image.mode == "RGB" and _orientation(image) == 1:
        return Member("jpg", data, image.width, image.height, None)
    if fmt == "PNG" and _png_header(data) == (8, 2):
        return Member("png", data, image.width, image.height, None)
    if fmt == "JPEG" and _orientation(image) != 1:
        reason = "exif-rotated jpeg"
        image = ImageOps.exif_transpose(image)
    elif fmt == "JPEG":
        reason = f"{image.mode.lower()} jpeg"
    elif fmt == "PNG":
        depth, colour = _png_header(data)
        reason = "16-bit png" if depth == 16 else f"{image.mode.lower()} png"
    else:
        reason = (fmt or "unknown").lower()
    array = _to_rgb(image)
    return Member("png", _encode_png(array), array.shape[1], array.shape[0], reason)


def _alpha_array(image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(image, dtype=np.float64)
        return np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        channels = np.asarray(image)
        a = channels[..., -1]
        if a.min() < 255:  # a real transparency channel holds the matte
            return np.ascontiguousarray(a)
        image = image.convert("RGB" if image.mode == "RGBA" else "L")
    return np.asarray(image.convert("L"))


def load_grey(path: str, role: str, max_pixels: int = DEFAULT_MAX_PIXELS, binary: bool = False) -> Member:
    """An 8-bit grey PNG member (alpha, trimap or mask).

    ``binary`` (segmentation masks) stores 0/255: masks holding only 0 and 1 are scaled, others are
    thresholded at 128 (the reason is recorded).
    """
    data, image = _open(path, max_pixels)
    stored_as_is = image.format == "PNG" and _png_header(data) == (8, 0)
    array = None
    if binary:
        array = np.asarray(image) if stored_as_is else _alpha_array(image)
        values = np.unique(array)
        if not np.isin(values, (0, 255)).all():
            scaled = values.max() <= 1
            array = (array * 255 if scaled else np.where(array >= 128, 255, 0)).astype(np.uint8)
            return Member("png", _encode_png(array), image.width, image.height,
                          f"{role} 0/1 scaled to 0/255" if scaled else f"{role} thresholded at 128")
    if stored_as_is:
        return Member("png", data, image.width, image.height, None)
    if image.format == "PNG":
        depth, colour = _png_header(data)
        reason = f"16-bit {role}" if depth == 16 else f"{image.mode.lower()} {role}"
    else:
        reason = f"{(image.format or 'unknown').lower()} {role}"
    array = _alpha_array(image) if array is None else array
    return Member("png", _encode_png(np.ascontiguousarray(array)), array.shape[1], array.shape[0], reason)


def split_rgba(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Member, Member]:
    """A cut-out with transparency -> (foreground RGB member, alpha member)."""
    data, image = _open(path, max_pixels)
    if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
        raise BadInput(f"no alpha channel (mode {image.mode}); --rgba expects cut-outs with transparency")
    rgba = np.asarray(image.convert("RGBA"))
    fg, alpha = np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])
    h, w = alpha.shape
    return (Member("png", _encode_png(fg), w, h, "rgba cut-out split"),
            Member("png", _encode_png(alpha), w, h, "rgba cut-out split"))


def decode_member(data: bytes) -> np.ndarray:
    """Decode a stored member fully (used by verify)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image)
