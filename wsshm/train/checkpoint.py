"""DeepSpeed checkpoints that load without unpickling arbitrary objects.

DeepSpeed writes its checkpoints with ``torch.save`` and reads them with ``weights_only=False``, which
runs whatever a checkpoint file's pickle asks for. ``SafeCheckpointEngine`` reads them with
``weights_only=True`` instead, allowing only the few plain classes DeepSpeed itself stores. Our
``client_state`` holds only tensors, numbers, strings, lists and dicts, so it passes too.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from wsshm.atomic import write_json


def _deepspeed_safe_globals() -> list:
    """Plain-data classes that appear inside DeepSpeed's own checkpoint dicts."""
    allowed: list = [OrderedDict, torch.Size]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        allowed.append(ZeroStageEnum)
    except ImportError:  # pragma: no cover - older DeepSpeed
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed.append(fragment_address)
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:  # pragma: no cover
        pass
    return allowed


class SafeCheckpointEngine(TorchCheckpointEngine):
    """``TorchCheckpointEngine`` whose ``load`` refuses anything but tensors and plain data."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as error:  # noqa: BLE001 - re-raised with the file's name
                raise ValueError(f"cannot load checkpoint file {path}: {error}") from error


STEP_TAG = re.compile(r"step[0-9]{8}")  # the tags the trainer writes; other folders are the user's


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The tag DeepSpeed recorded in ``checkpoint_dir/latest``, if that tag's folder exists."""
    latest = Path(checkpoint_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text(errors="replace").strip()
    return tag if STEP_TAG.fullmatch(tag) and (Path(checkpoint_dir) / tag).is_dir() else None


RANK_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_([0-9]+)_mp_rank_00_(optim|model)_states\.pt")


def _missing_rank_files(files: list[Path], world_size: int, zero_stage: int) -> str | None:
    """A per-rank ZeRO file that a save killed half-way (or a copy) left out; DeepSpeed would fail on it
    only after it has built the engine, in a traceback."""
    ranks: dict[str, set[int]] = {}
    for path in files:
        match = RANK_FILE.fullmatch(path.name)
        if match:
            ranks.setdefault(match.group(2), set()).add(int(match.group(1)))
    if zero_stage >= 1:
        ranks.setdefault("optim", set())
    for kind, found in sorted(ranks.items()):
        missing = sorted(set(range(world_size)) - found)
        if missing:
            return f"rank {missing[0]}'s ZeRO {kind} states file is missing ({len(found)} of {world_size} ranks' present)"
    return None


def _loadable(tag_dir: Path, world_size: int = 1, zero_stage: int = 0) -> str | None:
    """Why the checkpoint in ``tag_dir`` cannot be resumed from (None: every rank's files are there and
    open as plain data).

    The files are memory-mapped, so a truncated or hostile file is found without reading the tensors."""
    files = sorted(tag_dir.glob("*.pt"))
    if not files:
        return "no checkpoint files"
    for path in files:
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # noqa: BLE001 - any reason makes the checkpoint unusable
            if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error):
                return f"{path.name}: holds objects other than tensors and plain data (not loaded: that could run code)"
            return f"{path.name}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    return _missing_rank_files(files, world_size, zero_stage)


def resume_tag(checkpoint_dir: Path, world_size: int = 1, zero_stage: int = 0) -> tuple[str | None, list[str]]:
    """The newest checkpoint that loads, starting from DeepSpeed's ``latest``, and the reasons the
    newer ones were passed over (a save killed half-way, a truncated or tampered file, a rank's file
    missing)."""
    checkpoint_dir = Path(checkpoint_dir)
    latest = latest_tag(checkpoint_dir)
    tags = sorted((p.name for p in checkpoint_dir.glob("step*") if p.is_dir() and STEP_TAG.fullmatch(p.name)),
                  reverse=True)
    if latest is not None:
        tags = [latest] + [t for t in tags if t < latest]
    skipped = []
    for tag in tags:
        problem = _loadable(checkpoint_dir / tag, world_size, zero_stage)
        if problem is None:
            return tag, skipped
        skipped.append(f"{checkpoint_dir / tag}: {problem}")
    return None, skipped


def planted_links(out: Path) -> list[Path]:
    """Symbolic links where a run writes: the run folder's own entries, and everything under its
    ``checkpoints/`` and ``tb/`` (DeepSpeed and TensorBoard open their files by name and would follow
    a link to a file outside the run)."""
    out = Path(out)
    if not out.is_dir():
        return []
    links = [p for p in out.iterdir() if p.is_symlink()]
    for sub in ("checkpoints", "tb"):
        if (out / sub).is_dir() and not (out / sub).is_symlink():
            for folder, dirs, files in os.walk(out / sub):  # does not descend into linked folders
                links += [Path(folder) / n for n in dirs + files if (Path(folder) / n).is_symlink()]
    return sorted(links)


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (tags sort by step)."""
    tags = sorted(p for p in Path(checkpoint_dir).glob("step*") if p.is_dir() and STEP_TAG.fullmatch(p.name))
    for old in tags[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def read_run_info(out: Path) -> dict | None:
    """``OUT/run.json``, None when there is none; ``ValueError`` naming it when it is not a JSON object."""
    path = Path(out) / "run.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: not a JSON object")
    return info


def write_run_info(out: Path, info: dict) -> None:
    write_json(Path(out) / "run.json", info, indent=2)
