"""Checking input images and turning them into shard members.

Valid 8-bit RGB JPEG/PNG bytes (and 8-bit grey PNG labels) are stored exactly as read. Anything else
(webp, bmp, tiff, 16-bit PNG, palette or RGBA images, CMYK JPEG, EXIF-rotated JPEG, RGB alphas) is
decoded and re-encoded once as PNG, and the reason is returned so the manifest can count it.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wsshm.image import MAX_IMAGE_PIXELS

# The converter's --max-pixels default, and its ceiling: it keeps no image the readers would refuse.
DEFAULT_MAX_PIXELS = MAX_IMAGE_PIXELS


class BadInput(Exception):
    """Image bytes wsshm cannot use: an input file that cannot become part of a sample (the message is
    the reason in errors.jsonl) or a stored member that does not decode; the caller names the file."""


@dataclass
class Member:
    ext: str  # "jpg" or "png"
    data: bytes
    width: int
    height: int
    normalised: str | None  # why it was re-encoded, None when stored as read
    blank: bool = False  # a label with no foreground pixel (every value 0)


def _png_header(data: bytes):
    """(bit depth, colour type) from a PNG's IHDR chunk."""
    if len(data) < 29 or data[12:16] != b"IHDR":
        return None, None
    return data[24], data[25]


def _encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """``data`` opened by Pillow with only its header read; ``BadInput`` before any pixel is decoded
    when it is empty, not an image, or has more than ``max_pixels`` (at most ``MAX_IMAGE_PIXELS``).

    Pillow's own bomb check (its process-wide ``Image.MAX_IMAGE_PIXELS``, which wsshm leaves as the
    program has it) warns above its limit and raises above twice that; ours is the limit that counts,
    so its warning is silenced here and its error reported as ours."""
    limit = min(max_pixels, MAX_IMAGE_PIXELS)
    if not data:
        raise BadInput("empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        raise BadInput(f"decompression bomb: {pixels.group(1) if pixels else 'more'} pixels is over the limit of "
                       f"{limit} pixels") from exc
    except UnidentifiedImageError as exc:
        raise BadInput("not an image (no decoder recognises its bytes)") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file, named by the caller
        raise BadInput(f"truncated or corrupt image header ({exc})") from exc
    width, height = image.size
    if width * height > limit:
        raise BadInput(f"decompression bomb: {width}x{height} = {width * height} pixels is over the limit of "
                       f"{limit} pixels")
    return image


def _open(path: str, max_pixels: int):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BadInput(f"unreadable file ({exc.strerror or exc})") from exc
    if not data:
        raise BadInput("empty file (0 bytes)")
    image = open_image(data, max_pixels)
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


def _class_indices(image) -> bool:
    """Whether a palette image's pixel values are class indices (a VOC-style label map) rather than
    colours: unless every colour it uses is black or white, its colours say nothing about the person."""
    if image.mode != "P" or "transparency" in image.info:
        return False
    palette = np.asarray(image.getpalette() or [], np.uint8).reshape(-1, 3)
    used = np.unique(np.asarray(image))
    if used.max() >= len(palette):
        return True
    colours = palette[used]
    return not (np.isin(colours, (0, 255)).all() and (colours.min(1) == colours.max(1)).all())


def _binary_mask(array: np.ndarray, role: str, class_map: bool) -> tuple[np.ndarray, str | None]:
    """A mask as 0/255 and the reason it was changed (None when it already was).

    - 0 and one other value ``v`` (0/1, or 0/15: VOC's person class alone): ``v`` is the foreground;
    - a class map (palette indices, or several grey values all below 128, which thresholding would
      leave empty): refused, as nothing says which class is the person;
    - anything else (soft, anti-aliased or JPEG-compressed masks): thresholded at 128.
    """
    values = np.unique(array)
    if np.isin(values, (0, 255)).all():
        return array, None
    if len(values) == 2 and values[0] == 0:
        return np.where(array > 0, 255, 0).astype(np.uint8), f"{role} 0/{values[1]} scaled to 0/255"
    listed = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
    advice = f"wsshm cannot tell which class is the person (save the {role} as 0/255, or 0 and one value)"
    if class_map:
        raise BadInput(f"palette {role} with indices {listed}: a class map; {advice}")
    if values.max() < 128:
        raise BadInput(f"{role} values {listed} are all below 128: a class map; {advice}")
    return np.where(array >= 128, 255, 0).astype(np.uint8), f"{role} thresholded at 128"


def load_grey(path: str, role: str, max_pixels: int = DEFAULT_MAX_PIXELS, binary: bool = False) -> Member:
    """An 8-bit grey PNG member (alpha, trimap or mask); ``blank`` when it holds no foreground.

    ``binary`` (segmentation masks) stores 0/255 by :func:`_binary_mask`'s rule; a palette mask is read
    by its indices unless its colours are black and white.
    """
    data, image = _open(path, max_pixels)
    stored_as_is = image.format == "PNG" and _png_header(data) == (8, 0)
    array = None
    if binary:
        class_map = _class_indices(image)
        array = np.asarray(image) if stored_as_is or class_map else _alpha_array(image)
        array, reason = _binary_mask(array, role, class_map)
        if reason:
            return Member("png", _encode_png(array), image.width, image.height, reason, not array.any())
    if stored_as_is:
        blank = not np.asarray(image).any() if array is None else not array.any()
        return Member("png", data, image.width, image.height, None, blank)
    if image.format == "PNG":
        depth, colour = _png_header(data)
        reason = f"16-bit {role}" if depth == 16 else f"{image.mode.lower()} {role}"
    else:
        reason = f"{(image.format or 'unknown').lower()} {role}"
    array = _alpha_array(image) if array is None else array
    return Member("png", _encode_png(np.ascontiguousarray(array)), array.shape[1], array.shape[0], reason,
                  not array.any())


def split_rgba(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Member, Member]:
    """A cut-out with transparency -> (foreground RGB member, alpha member)."""
    data, image = _open(path, max_pixels)
    if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
        raise BadInput(f"no alpha channel (mode {image.mode}); --rgba expects cut-outs with transparency")
    rgba = np.asarray(image.convert("RGBA"))
    fg, alpha = np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])
    h, w = alpha.shape
    return (Member("png", _encode_png(fg), w, h, "rgba cut-out split"),
            Member("png", _encode_png(alpha), w, h, "rgba cut-out split", not alpha.any()))


def decode_member(data: bytes) -> np.ndarray:
    """Decode a stored member fully, as Pillow stores it (used by verify); ``BadInput`` as
    :func:`open_image` for empty, unknown and oversized members."""
    image = open_image(data)
    image.load()
    return np.asarray(image)
