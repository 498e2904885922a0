"""From input folders to samples: pairing files by relative path, and building one sample's members."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from wsshm.image import IMAGE_SUFFIXES
from .images import BadInput, load_grey, load_rgb, split_rgba
from .layout import MEMBERS, META_MEMBER, sample_key

# Tar names longer than this do not fit a USTAR header (which DALI's reader expects).
MAX_KEY_LENGTH = 200


@dataclass
class SampleSpec:
    key: str
    source: str  # path of the image relative to its input root
    paths: dict  # role ("image", "alpha", "mask", "trimap", "rgba") -> absolute path
    meta: dict = field(default_factory=dict)  # extra fields of the sample's json (pseudo labels' scores)


@dataclass
class Scan:
    samples: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # {"path": ..., "reason": ...}
    ignored: int = 0  # files that are not images by extension


def _list_images(root: Path, scan: Scan, role: str) -> dict:
    """relative stem -> path, for the image files under ``root`` (extensions case-insensitive)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: {role} folder not found")
    found, duplicates = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                scan.ignored += 1
                continue
            stem = path.relative_to(root).with_suffix("").as_posix()
            if stem in found:
                duplicates.setdefault(stem, [found[stem]]).append(path)
            else:
                found[stem] = path
    for stem, paths in duplicates.items():
        del found[stem]
        for path in paths:
            others = ", ".join(p.name for p in paths if p != path)
            scan.errors.append({"path": str(path), "reason": f"ambiguous {role}: same name as {others}"})
    return found


def pair_folders(image_root, partners: dict, optional: dict | None = None, image_role="image") -> Scan:
    """Pair ``image_root`` with each folder in ``partners`` (role -> folder) by relative path without
    extension; ``optional`` folders (e.g. trimaps) pair when a file is there. Unpaired files are errors."""
    scan = Scan()
    images = _list_images(Path(image_root), scan, image_role)
    found = {role: _list_images(Path(folder), scan, role) for role, folder in partners.items()}
    extra = {role: _list_images(Path(folder), scan, role) for role, folder in (optional or {}).items()}
    keys = {}
    for stem, path in sorted(images.items()):
        missing = [role for role in partners if stem not in found[role]]
        if missing:
            scan.errors.append({"path": str(path), "reason": f"{image_role} without a partner {' or '.join(missing)} "
                                f"(looked for {stem}.* in {', '.join(str(partners[r]) for r in missing)})"})
            continue
        key = sample_key(stem)
        if len(key) > MAX_KEY_LENGTH:
            scan.errors.append({"path": str(path), "reason": f"relative path longer than {MAX_KEY_LENGTH} characters"})
            continue
        if key in keys:
            scan.errors.append({"path": str(path), "reason": f"key {key!r} collides with {keys[key]} once dots and "
                                "spaces become '_'; rename one of them"})
            continue
        keys[key] = path
        paths = {image_role: str(path)}
        paths.update({role: str(found[role][stem]) for role in partners})
        paths.update({role: str(extra[role][stem]) for role in extra if stem in extra[role]})
        scan.samples.append(SampleSpec(key, path.relative_to(image_root).as_posix(), paths))
    for role, files in [*found.items(), *extra.items()]:
        for stem, path in sorted(files.items()):
            if stem not in images:
                scan.errors.append({"path": str(path), "reason": f"{role} without an image (no {stem}.* in {image_root})"})
    return scan


def _check_size(member, image, path, image_path):
    if (member.width, member.height) != (image.width, image.height):
        raise BadInput(f"size {member.width}x{member.height} differs from its image's "
                       f"{image.width}x{image.height} ({image_path})", path)


def build_sample(kind: str, spec: SampleSpec, max_pixels: int):
    """One sample's tar members, or the list of its broken files.

    Returns ``(members, reasons, None)`` with ``members`` ready for webdataset's TarWriter and
    ``reasons`` the normalisations applied, or ``(None, None, errors)``. A mask or alpha with no
    foreground is kept with a warning line on stderr naming its file.
    """
    errors, members, labels = [], {}, {}
    image = None
    try:
        if "rgba" in spec.paths:
            image, labels["alpha"] = split_rgba(spec.paths["rgba"], max_pixels)
        else:
            image = load_rgb(spec.paths["image"], max_pixels)
    except BadInput as exc:
        errors.append({"path": spec.paths.get("rgba", spec.paths.get("image")), "reason": str(exc)})
    for role in ("alpha", "mask", "trimap"):
        if role not in spec.paths:
            continue
        try:
            member = load_grey(spec.paths[role], role, max_pixels, binary=(role == "mask"))
            if image is not None:
                _check_size(member, image, spec.paths[role], spec.paths["image"])
            labels[role] = member
        except BadInput as exc:
            errors.append({"path": spec.paths[role], "reason": exc.args[0]})
    if errors:
        return None, None, errors
    for role, member in labels.items():
        if member.blank and role in ("mask", "alpha"):
            # kept (an image without a person is possible), but more often a mask that lost its person
            # on the way (a class map, a scaled 16-bit file): the user should look at it
            print(f"warning: {spec.paths.get(role, spec.paths.get('rgba'))}: {role} has no foreground (every pixel 0); "
                  "the sample is kept and trains as background only", file=sys.stderr, flush=True)
    members[MEMBERS[kind].image_member(image.ext)] = image.data
    for role, member in labels.items():
        members[f"{role}.png"] = member.data
    meta = {**spec.meta, "source": spec.source, "width": image.width, "height": image.height}
    members[META_MEMBER] = json.dumps(meta).encode()
    reasons = [m.normalised for m in [image, *labels.values()] if m.normalised]
    return members, sorted(set(reasons)), None
